"""Where does a toy sample's outcome get decided? The step-by-step sensitivity behind ``train_steps``.

For every sampling step ``k`` of a config's rollout sampler, the held-out prompts are sampled twice from
the same starting noise with the config's stochastic dynamics at step ``k`` only (ODE elsewhere) and two
different noise draws there. If step ``k``'s noise decides much of the outcome, the two samples often
disagree (verifier pass/fail, graded score); if it decides little, they agree. A GRPO update can only
credit what the noise of its trained steps changes, so the steps worth training are the ones that move
the outcome. Reference rows: the same pair from two different starting noises (chance level: nothing
shared), and the outcome's sensitivity to the starting noise itself (mixing in a fraction ``delta`` of
fresh noise: how finely grained success is in noise space).

Writes ``--out`` (JSON) and the same name with ``.png``.

    python benchmarks/toy_step_sensitivity.py
    python benchmarks/toy_step_sensitivity.py --config lightning_configs/toy/grpo.yaml --samples 2

Not a test; about 4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flowrl.cli import main  # noqa: E402


def _agreement(a: dict, b: dict) -> dict:
    p, q = a["correct"].mean(), b["correct"].mean()
    return {
        "accuracy": [round(float(p), 4), round(float(q), 4)],
        "agreement": round(float((a["correct"] == b["correct"]).mean()), 4),
        "chance_agreement": round(float(p * q + (1 - p) * (1 - q)), 4),
        # None when a side's scores are all equal (no correlation to speak of)
        "score_correlation": round(float(np.corrcoef(a["score"], b["score"])[0, 1]), 4)
        if a["score"].std() > 0 and b["score"].std() > 0
        else None,
    }


def run(config: str, samples: int, overrides: list[str]) -> dict:
    cli = main(
        [
            "--config",
            config,
            "--trainer.logger=false",
            "--trainer.callbacks=[]",
            "--trainer.enable_checkpointing=false",
        ]
        + overrides,
        run=False,
    )
    module = cli.model
    module.policy.eval()
    reward = next(iter(module.reward_fn.rewards.values()))
    if not hasattr(reward, "evaluate"):
        raise SystemExit(
            f"the config's first reward ({type(reward).__name__}) has no evaluate(): use a toy config"
        )
    prompts = [p for p in cli.datamodule.val_prompts for _ in range(samples)]
    n_steps, size = module.num_inference_steps, module.height
    sigmas = module.policy.sigmas(n_steps, size, size).tolist()

    def outcome(latents: torch.Tensor, steps: list[int], seed: int) -> dict:
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            images = module.sampler.sample(
                prompts,
                size,
                size,
                n_steps,
                module.guidance_scale,
                torch.Generator().manual_seed(seed),
                train_steps=steps,
                latents=latents.clone(),
            ).images.float()
        verdicts = reward.evaluate(images, prompts)
        return {
            "correct": np.array([v.correct for v in verdicts]),
            "score": np.array([v.score for v in verdicts]),
        }

    def start(seed: int) -> torch.Tensor:
        return module.policy.prepare_latents(len(prompts), size, size, torch.Generator().manual_seed(seed))

    x0, other = start(1), start(2)
    ode = outcome(x0, [], 0)
    result = {
        "config": config,
        "overrides": overrides,
        "dynamics": repr(module.dynamics),
        "guidance_scale": module.guidance_scale,
        "samples": len(prompts),
        "sigmas": [round(s, 4) for s in sigmas],
        "ode_accuracy": round(float(ode["correct"].mean()), 4),
        "independent_starts": _agreement(ode, outcome(other, [], 0)),
        "start_noise_mix": {},
        "steps": [],
    }
    fresh = start(3)
    for delta in (0.02, 0.05, 0.1, 0.2):
        mixed = (1 - delta**2) ** 0.5 * x0 + delta * fresh
        result["start_noise_mix"][str(delta)] = _agreement(ode, outcome(mixed, [], 0))
    for k in range(n_steps - 1):
        row = {"step": k, "sigma": round(sigmas[k], 4), "sigma_next": round(sigmas[k + 1], 4)}
        row.update(_agreement(outcome(x0, [k], 10 + k), outcome(x0, [k], 100 + k)))
        result["steps"].append(row)
        print(json.dumps(row), flush=True)
    return result


def _nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else value


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = result["steps"]
    labels = [f"{r['step']}\n{r['sigma']:.2f}" for r in steps]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(labels, [r["agreement"] for r in steps], "o-", label="pass/fail agreement")
    ax.plot(
        labels, [_nan_if_none(r["score_correlation"]) for r in steps], "s-", label="graded score correlation"
    )
    ref = result["independent_starts"]
    ax.axhline(ref["agreement"], color="C0", ls="--", lw=1, label="agreement, unrelated samples")
    ax.axhline(
        _nan_if_none(ref["score_correlation"]),
        color="C1",
        ls="--",
        lw=1,
        label="correlation, unrelated samples",
    )
    ax.set_xlabel("stochastic step (and its sigma); ODE elsewhere")
    ax.set_ylim(0, 1.02)
    ax.set_title("Two noise draws at one step, same start: how alike the outcomes are")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "lightning_configs" / "toy" / "grpo.yaml"))
    parser.add_argument("--samples", type=int, default=2, help="samples per held-out prompt")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "toy_step_sensitivity.json"))
    args, overrides = parser.parse_known_args()
    t0 = time.time()
    res = run(args.config, args.samples, overrides)
    res["wall_time_s"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    plot(res, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out} ({res['wall_time_s']} s)")
