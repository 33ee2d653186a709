"""The toy world: procedural shapes prompts/images, a shipped tiny SD3 model and a rule-based verifier."""

from pathlib import Path

TOY_DIR = Path(__file__).resolve().parent
TOY_CHECKPOINT = TOY_DIR / "checkpoint"
TOY_TRAIN_PROMPTS = TOY_DIR / "prompts" / "train.txt"
TOY_HELDOUT_PROMPTS = TOY_DIR / "prompts" / "heldout.txt"
TOY_EVAL_PROMPTS = TOY_DIR / "prompts" / "eval.txt"
