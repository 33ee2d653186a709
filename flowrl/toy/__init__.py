"""The toy world: procedural shapes prompts/images, a shipped tiny SD3 model and a rule-based verifier."""

from pathlib import Path

from flowrl.plugins import register_model_alias, register_preference_sets, register_prompt_sets

TOY_DIR = Path(__file__).resolve().parent
TOY_CHECKPOINT = TOY_DIR / "checkpoint"
TOY_TRAIN_PROMPTS = TOY_DIR / "prompts" / "train.txt"
TOY_HELDOUT_PROMPTS = TOY_DIR / "prompts" / "heldout.txt"
TOY_EVAL_PROMPTS = TOY_DIR / "prompts" / "eval.txt"

# The toy registers its names itself (flowrl finds it through the flowrl.plugins entry point of setup.cfg):
# the shipped model (and DiffusionOPD's teachers), its prompt sets (toy:train, toy:train_balanced, toy:heldout,
# toy:eval), and the verifier reward (``shapes``, registered when flowrl.toy.verifier is imported).
register_model_alias("flowrl:toy", lambda: str(TOY_CHECKPOINT))
# DiffusionOPD's two toy teachers (LoRAs of the toy model, scripts/make_toy_teachers.py): flowrl:toy-teacher-<name>
for _name in ("graded", "strict"):
    register_model_alias(f"flowrl:toy-teacher-{_name}", lambda name=_name: str(TOY_DIR / "teachers" / name))
register_prompt_sets("toy", lambda name: str(TOY_DIR / "prompts" / f"{name}.txt"))
register_preference_sets("toy", lambda name: str(TOY_DIR / "preferences" / f"{name}.jsonl"))
from flowrl.toy import verifier  # noqa: E402,F401  (registers the shapes reward)
