"""Every toy config raises the toy reward over a short run on the shipped toy model.

Each run is the config as shipped (algorithm, dynamics, noise level, clip range, KL reference, EMA
and off-policy callbacks ...) shrunk to a CPU budget of about 15 seconds: two prompts the model gets
partly right (so that groups have reward variance), a larger learning rate, fewer sampling steps, no
validation, checkpoints or loggers. Before and after training, the weights that validation would
use (the config's EMA when it swaps one in) sample the same prompts from the same starting noise with
the deterministic eval sampler; the mean verifier score must rise by ``MARGIN``. The comparison is
paired (same noise, same prompts), so it measures the change of the model, not sampling noise.
The full-length curves of these configs side by side: ``benchmarks/toy_compare.py`` (the table of docs/status.md).
"""

from __future__ import annotations

import contextlib
import os

import lightning as L
import pytest
import torch
from conftest import parsed_config

from callbacks import EMA, OffPolicySampling
from flowrl.cli import main
from flowrl.toy import TOY_CHECKPOINT

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = ["grpo", "flow_grpo", "dance_grpo", "cps_grpo", "mix_grpo", "grpo_guard", "nft", "awm", "dppo", "dgpo", "dpo",
           "dpo_offline", "crd", "opd"]
#: configs trained on a preference set instead of sampled prompts
OFFLINE = ("dpo_offline",)

# The short run: two single-object prompts the shipped model gets partly right (eval reward about 0.3: it often
# draws the other shape), each listed twice so that an iteration holds four groups of 8 (DanceGRPO starts a whole
# group from one noise: with two groups an iteration rested on two starting points, and one seed in three barely
# learned), 8 iterations at three times each config's learning rate (DanceGRPO twice: at 3 times one seed in three
# collapsed; CRD twice: at 3 times seed 0 gained 0.17, at 5 times one seed lost 0.23). The offline config trains
# on the shipped preference pairs instead (8 pairs an iteration). Measured over three seeds by
# benchmarks/toy_learning_spread.py (benchmarks/toy_learning_spread.json): every config's smallest gain is at least
# twice MARGIN.
SETTINGS = {
    "prompts": ["a circle", "a square", "a circle", "a square"],
    "iterations": 8,
    "group_size": 8,
    "num_inference_steps": 6,
    "eval_samples_per_prompt": 16,
    # times the config's own learning rate ("default" unless the config is listed)
    "lr_scale": {"default": 3.0, "dance_grpo": 2.0, "crd": 2.0},
}
MARGIN = 0.1


def short_run_args(name: str, settings: dict | None = None) -> list[str]:
    s = {**SETTINGS, **(settings or {})}
    prompts, group = s["prompts"], s["group_size"]
    samples = len(prompts) * group
    args = [
        "--config", os.path.join(ROOT, "lightning_configs", "toy", f"{name}.yaml"),
        f"--trainer.max_steps={s['iterations']}",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=false",
        # float32 on every CPU kind: the check then runs the same numerics everywhere (the configs leave the
        # precision to the CPU, a speed choice tested in test_precision.py)
        "--trainer.precision=32-true",
        f"--model.group_size={group}",
        f"--model.num_inference_steps={s['num_inference_steps']}",
    ]
    if name in OFFLINE:  # the shipped preference pairs (24 of the 64 are of the two prompts): 8 pairs an iteration
        args += ["--model.train_batch_size=16", "--model.gradient_accumulation_steps=1", "--data.batch_size=8"]
    else:
        args += [
            f"--model.train_batch_size={samples // 2}",
            "--model.gradient_accumulation_steps=2",  # one optimizer step per iteration
            f"--data.train_prompts=[{', '.join(repr(p) for p in prompts)}]",
            f"--data.batch_size={samples}",
        ]
    scale = s["lr_scale"].get(name, s["lr_scale"]["default"])
    if scale != 1.0:
        lr = parsed_config(os.path.join(ROOT, "lightning_configs", "toy", f"{name}.yaml"))["model"]["init_args"]["optimizer"][
            "init_args"]["lr"]
        args.append(f"--model.optimizer.init_args.lr={float(lr) * scale}")
    return args


def sampler_key(module) -> tuple:
    """What the base model's eval score depends on (batched or separate CFG branches are bitwise different)."""
    return (module.height, module.width, module.num_inference_steps, module.guidance_scale,
            module.policy.uncond_gradient)


_BEFORE: dict[tuple, float] = {}  # the base model's score, the same for every config sampled alike


def eval_reward(module, settings: dict | None = None) -> float:
    """Mean verifier score of the eval sampler on the short run's prompts, from a fixed starting noise."""
    s = {**SETTINGS, **(settings or {})}
    prompts = [p for p in s["prompts"] for _ in range(s["eval_samples_per_prompt"])]
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        out = module.sampler.sample(prompts, module.height, module.width, module.num_inference_steps,
                            module.guidance_scale, gen)
    return float(module.reward_fn(out.images, prompts).mean())


class RatioDeviations(L.Callback):
    """``train/ratio_first_update_max_abs_dev`` of every iteration."""

    def __init__(self):
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        value = trainer.callback_metrics.get("train/ratio_first_update_max_abs_dev")
        if value is not None:
            self.values.append(float(value))


def validation_weights(trainer, module):
    """The weights validation uses: the EMA average when an EMA callback swaps one in, else the live ones."""
    ema = EMA.used_for_validation(trainer.callbacks)
    return ema.swapped(module) if ema is not None else contextlib.nullcontext()


@pytest.mark.toy_learning
@pytest.mark.parametrize("name", CONFIGS)
def test_toy_config_raises_the_reward(name, tmp_path, monkeypatch):
    assert (TOY_CHECKPOINT / "model_index.json").exists(), "the shipped toy model is missing: run scripts/pretrain_toy.py"
    monkeypatch.chdir(tmp_path)
    cli = main(short_run_args(name), run=False)
    key = sampler_key(cli.model)
    if key not in _BEFORE:  # every config starts from the shipped weights: score them once per sampler setting
        _BEFORE[key] = eval_reward(cli.model)
    before = _BEFORE[key]
    ratios = RatioDeviations()
    cli.trainer.callbacks.append(ratios)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.model.iteration == SETTINGS["iterations"]
    # the first update of an iteration reproduces the rollout exactly (on-policy; an off-policy config's
    # ratio is against the EMA sampler, which equals the live weights only before the first update)
    if name not in ("nft", "dgpo", "dpo", "dpo_offline", "crd", "opd"):  # these have no probability ratio
        on_policy = not any(isinstance(cb, OffPolicySampling) and cb.off_policy for cb in cli.trainer.callbacks)
        checked = ratios.values if on_policy else ratios.values[:1]
        assert len(ratios.values) == SETTINGS["iterations"] and checked and all(v == 0.0 for v in checked), ratios.values
    with validation_weights(cli.trainer, cli.model):
        after = eval_reward(cli.model)
    print(f"{name}: eval reward {before:.3f} -> {after:.3f}")
    assert after > before + MARGIN, f"{name}: the eval reward went {before:.3f} -> {after:.3f} in {SETTINGS['iterations']} iterations"
