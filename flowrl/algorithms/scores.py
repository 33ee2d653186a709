"""From a rollout's reward scores to the samples to train on and their advantages.

``on_reward_error`` (what a failing reward does: it raises, returns NaN / inf or the wrong count):

* ``stop``: raise before any update of the iteration; with several processes every process stops;
* ``skip_group``: drop the groups with a failed sample from the iteration (logged); with several processes a
  failure anywhere skips the whole iteration on every process (their updates must stay in step).
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn

from flowrl.advantages import estimate_advantages
from flowrl.algorithms.update import world_size
from flowrl.errors import ConfigError
from flowrl.rewards import RewardError, RewardScores, RewardSpec, WeightedReward

__all__ = ["ON_REWARD_ERROR", "accept_scores", "advantages", "reward_function"]

ON_REWARD_ERROR = ("stop", "skip_group")


def reward_function(rewards, on_reward_error: str, async_rewards: bool, rollout_batch_size: int | None):
    """One :class:`WeightedReward` in every case (a plain callable is its one term: its checks guard every reward),
    after the checks of the options that say how it is called."""
    if on_reward_error not in ON_REWARD_ERROR:
        raise ConfigError(f"model.on_reward_error must be one of {', '.join(ON_REWARD_ERROR)}; got {on_reward_error!r}")
    if async_rewards and rollout_batch_size is not None:
        raise ConfigError("async_rewards scores each micro-batch as it finishes sampling, and rollout_batch_size "
                          "samples the whole batch step by step (no micro-batch finishes early); set one of "
                          "them: rollout_batch_size: null or async_rewards: false")
    reward_fn = rewards if isinstance(rewards, WeightedReward) else WeightedReward.from_specs(
        [rewards] if callable(rewards) else rewards or [RewardSpec("jpeg_compressibility")])
    groupwise = [k for k, r in reward_fn.rewards.items() if getattr(r, "groupwise", False)]
    if async_rewards and groupwise:
        raise ConfigError(f"async_rewards scores each micro-batch as it is sampled; the groupwise reward(s) "
                          f"{groupwise} need whole groups: set async_rewards: false")
    return reward_fn


def _anywhere(module, flag: bool) -> bool:
    """``flag`` on any process."""
    return flag if world_size(module) == 1 else module.trainer.strategy.reduce_boolean_decision(flag, all=False)


def accept_scores(module, scores: RewardScores, group_ids: torch.Tensor) -> tuple[RewardScores, torch.Tensor | None]:
    """The scores to train on (failed samples scored 0) and the samples to train on (``None``: all)."""
    if module.on_reward_error == "stop":
        # With several processes all of them stop, not only the one whose reward failed (the others would
        # wait in the next collective until the timeout).
        if _anywhere(module, bool(scores.errors)):
            raise RewardError(module.reward_fn.stop_message(scores.errors) if scores.errors else
                              "the reward failed on another process; training stops there and here, no update made")
        return scores, None
    valid = scores.valid
    keep = ~torch.isin(group_ids, group_ids[~valid])  # samples whose whole group scored
    if world_size(module) > 1 and _anywhere(module, not bool(valid.all())):
        keep = torch.zeros_like(keep)
    skipped = int(torch.unique(group_ids[~keep]).numel())
    module.log("train/reward_skipped_groups", float(skipped), batch_size=len(group_ids))
    if scores.errors:
        rank_zero_warn(f"iteration {module.iteration}: dropped {skipped} group(s) after a reward failure: "
                       + "; ".join(scores.errors))
    if not valid.all():
        scores.total = torch.where(valid, scores.total, torch.zeros_like(scores.total))
    return scores, (None if keep.all() else keep)


def advantages(module, scores: RewardScores, group_ids: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """This process's advantages by the module's estimator, over the groups of every process."""
    names = list(scores.terms)
    terms = torch.stack([scores.terms[k] for k in names]) if names else scores.total.new_zeros((0, len(group_ids)))
    weights = torch.tensor([scores.weights[k] for k in names], dtype=torch.float32)
    gather = None
    if world_size(module) > 1:
        gather = lambda t: module.all_gather(t.to(module.device)).flatten().cpu()  # noqa: E731
    return estimate_advantages(module.advantage_estimator, scores.total, terms, weights, group_ids, keep,
                               module.global_std, gather, module.global_rank)
