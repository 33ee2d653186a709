"""What an iteration and a validation log: rewards, loss terms, and validation reward and verifier accuracy."""

from __future__ import annotations

import warnings

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics.aggregation import MeanMetric

from flowrl.diversity import diversity_by_prompt
from flowrl.rewards import RewardScores, WeightedReward

__all__ = ["ValidationMetrics", "announce", "log_rewards", "log_train"]


def announce(module) -> None:
    """One line at the start of fit instead of Lightning's model summary: the algorithm, how many parameters train,
    the dynamics. The frozen text encoders and VAE are in eval mode on purpose, so Lightning's warning about
    modules in eval mode is left out (that message only), as is its warning about checkpoints after the update."""
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    # flowrl's update (manual optimization) ends with the optimizer step, so a checkpoint taken at an iteration's
    # end holds the state after it: what resume needs (tests/e2e/test_resume.py), not the mistake Lightning warns of.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization and every_n_train_steps")
    total = sum(p.numel() for p in module.policy.parameters())
    trained = sum(p.numel() for p in module.policy.trainable_parameters())
    rank_zero_info(f"[flowrl] {type(module).__name__}: {trained:,} of {total:,} parameters trained "
                   f"({module.policy.finetune_type}), dynamics {module.dynamics!r}")


def log_rewards(module, scores: RewardScores, keep: torch.Tensor | None) -> None:
    """``train/reward_mean`` and ``train/reward_std`` of the trained samples; each term's mean with several rewards."""
    rewards = scores.total if keep is None else scores.total[keep]
    module.log("train/reward_mean", rewards.mean(), prog_bar=True, batch_size=len(rewards))
    module.log("train/reward_std", rewards.std(unbiased=False), batch_size=len(rewards))
    if len(scores.terms) > 1:
        for name, terms in scores.terms.items():
            module.log(f"train/reward_{name}", terms.nanmean(), batch_size=len(rewards))  # (failed: NaN)


def log_train(module, logs: dict[str, list[torch.Tensor]]) -> None:
    """The mean of each loss term over the iteration's micro-batches (the ratio's mean, min and max)."""
    for key, values in logs.items():
        v = torch.cat(values)
        if key == "ratio":
            module.log("train/ratio_mean", v.mean())
            module.log("train/ratio_min", v.min())
            module.log("train/ratio_max", v.max())
        else:
            module.log(f"train/{key}", v.mean(), prog_bar=key == "loss")
    module.log("train/lr", module.optimizers().param_groups[0]["lr"])
    module.log("train/iteration", float(module.iteration), prog_bar=True)
    for key, value in module.policy.compile_stats().items():  # perf/recompiles ... under policy.compile
        module.log(key, value)


class ValidationMetrics(nn.ModuleDict):
    """``reward``; for a verifier reward (one with ``evaluate``), ``<name>_acc_<category>`` means; and the samples'
    diversity among the samples of one prompt (:mod:`flowrl.diversity`), averaged over the prompts with two or more
    samples in a batch: ``diversity_pixel`` (mean pairwise RMS pixel distance) and ``diversity_colour`` (colour
    entropy, bits). A collapse (every sample of a prompt alike) shows in them while the reward may still rise."""

    def __init__(self, reward_fn: WeightedReward):
        super().__init__({"reward": MeanMetric(), "diversity_pixel": MeanMetric(), "diversity_colour": MeanMetric()})
        self.reward_fn = reward_fn
        for name, reward in reward_fn.rewards.items():
            if len(reward_fn.rewards) > 1:  # each term too, when there are several
                self[f"reward_{name}"] = MeanMetric()
            for category in getattr(reward, "categories", ()):
                self[f"{name}_acc_{category}"] = MeanMetric()

    def record(self, images: torch.Tensor, prompts, device, conditions=None) -> torch.Tensor:
        """Scores a validation batch with the validation rewards and records it; returns the weighted sums. A
        failing reward raises (:class:`flowrl.rewards.RewardError`), as in training."""
        scored = self.reward_fn.checked_score(images, prompts, None, conditions)
        rewards = scored.total
        self["reward"].update(rewards.to(device))
        for name, values in scored.terms.items() if len(scored.terms) > 1 else ():
            self[f"reward_{name}"].update(values.to(device))
        for pixel, colour in diversity_by_prompt(images, prompts).values():
            self["diversity_pixel"].update(pixel.to(device))
            self["diversity_colour"].update(colour.to(device))
        for name, reward in self.reward_fn.rewards.items():
            if not hasattr(reward, "evaluate"):
                continue
            for verdict in reward.evaluate(images, prompts):
                key = f"{name}_acc_{verdict.category}"
                if key not in self:
                    self[key] = MeanMetric().to(device)
                self[key].update(torch.tensor(float(verdict.correct), device=device))
        return rewards

    def compute(self, reduce_sum=None) -> dict[str, torch.Tensor]:
        """``val/...`` values, and ``val/<name>_acc_overall`` (the mean over categories, as GenEval); resets.

        compute() all-gathers across processes: every process computes the metrics any process updated (a category
        may be missing from one process's share of the prompts), in the same order, or they hang. ``reduce_sum``
        sums a tensor over the processes (None: one process)."""
        device = self["reward"].device
        updated = torch.tensor([float(m.update_called) for m in self.values()], device=device)
        if reduce_sum is not None:
            updated = reduce_sum(updated)
        values: dict[str, torch.Tensor] = {}
        by_reward: dict[str, list[torch.Tensor]] = {}
        for (key, metric), any_updated in zip(self.items(), updated.tolist()):
            if not any_updated:
                continue
            values[f"val/{key}"] = metric.compute()
            if "_acc_" in key:
                by_reward.setdefault(key.split("_acc_")[0], []).append(values[f"val/{key}"])
            metric.reset()
        for name, accs in by_reward.items():
            values[f"val/{name}_acc_overall"] = torch.stack(accs).mean()
        return values
