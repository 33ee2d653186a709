"""A failing reward never trains: ``on_reward_error: stop`` (no update) or ``skip_group`` (the groups it hit are dropped)."""

import pytest
import torch
from tiny import fit_one_iteration, make_module

from flowrl.algorithms import GRPO
from flowrl.errors import ConfigError
from flowrl.rewards import RewardError, RewardScores, WeightedReward


class Recording(GRPO):
    """GRPO that records which samples each loss saw."""

    def training_loss(self, rollout, advantages, idx, unit):
        self.seen = getattr(self, "seen", set()) | set(idx.tolist())
        return super().training_loss(rollout, advantages, idx, unit)


def nan_for_first_sample(images, prompts):
    scores = images.float().mean(dim=(1, 2, 3))
    scores[0] = float("nan")
    return scores


def raises(images, prompts):
    raise RuntimeError("reward model out of memory")


def fit(module, prompt_file):
    return fit_one_iteration(module, prompt_file, max_epochs=1, limit_train_batches=1)


def trained(module):
    return {n: p.detach().clone() for n, p in module.policy.named_trainable_parameters()}


@pytest.mark.parametrize("reward, match", [(nan_for_first_sample, "non-finite"), (raises, "out of memory")])
def test_stop_raises_before_any_update_and_names_the_fix(tiny_sd3_path, prompt_file, reward, match):
    module = make_module(Recording, tiny_sd3_path, rewards=[reward])
    before = trained(module)
    with pytest.raises(RewardError, match=match) as err:
        fit(module, prompt_file)
    assert "on_reward_error=skip_group" in str(err.value)
    assert not hasattr(module, "seen")
    assert all(torch.equal(p, before[n]) for n, p in module.policy.named_trainable_parameters())


def test_skip_group_drops_only_the_failed_group(tiny_sd3_path, prompt_file):
    module = make_module(Recording, tiny_sd3_path, rewards=[nan_for_first_sample], on_reward_error="skip_group",
                         gradient_accumulation_steps=1)
    before = trained(module)
    trainer = fit(module, prompt_file)
    # 4 samples in 2 groups of 2 (ids 0,0,1,1): the group of sample 0 is dropped, samples 2 and 3 train
    assert module.seen == {2, 3}
    assert float(trainer.logged_metrics["train/reward_skipped_groups"]) == 1.0
    assert torch.isfinite(trainer.logged_metrics["train/reward_mean"])
    changed = [n for n, p in module.policy.named_trainable_parameters() if not torch.equal(p, before[n])]
    assert changed and all(torch.isfinite(p).all() for p in module.policy.trainable_parameters())


def test_skip_group_with_every_group_failed_makes_no_update(tiny_sd3_path, prompt_file):
    module = make_module(Recording, tiny_sd3_path, rewards=[raises], on_reward_error="skip_group")
    before = trained(module)
    with pytest.warns(UserWarning, match="dropped 2 group"):
        trainer = fit(module, prompt_file)
    assert not hasattr(module, "seen") and trainer.global_step == 0 and module.iteration == 1
    assert all(torch.equal(p, before[n]) for n, p in module.policy.named_trainable_parameters())


def test_skipped_groups_take_no_part_in_the_advantages(tiny_sd3_path):
    module = make_module(GRPO, tiny_sd3_path, on_reward_error="skip_group", global_std=True)
    rewards, groups = torch.tensor([0.0, 1e6, 1.0, 3.0]), torch.tensor([0, 0, 1, 1])
    keep = torch.tensor([False, False, True, True])
    scores = RewardScores(rewards, torch.ones(4, dtype=torch.bool), [], {"r": rewards}, {"r": 1.0})
    adv = module.compute_advantages(scores, groups, keep)
    expected = module.compute_advantages(scores.select(keep), groups[2:])  # the batch without the dropped group
    assert adv[:2].eq(0).all()
    torch.testing.assert_close(adv[2:], expected)


@pytest.mark.parametrize("option, value, match", [
    ("on_reward_error", "ignore", "model.on_reward_error must be one of stop, skip_group"),
    ("advantage_aggregation", "mean", "advantage_aggregation 'mean' is unknown; choose one of sum, gdpo"),
    ("advantage_estimator", "mean", "advantage_estimator 'mean' is not registered; choose one of gdpo, group"),
])
def test_unknown_policy_names_the_choices(tiny_sd3_path, option, value, match):
    with pytest.raises(ConfigError, match=match):
        make_module(GRPO, tiny_sd3_path, **{option: value})


def test_score_reports_which_samples_failed():
    reward = WeightedReward({"a": nan_for_first_sample, "b": lambda i, p: torch.ones(len(p))}, {"a": 1.0, "b": 2.0})
    images = torch.rand(3, 3, 8, 8)
    scores = reward.score(images, ["x"] * 3)
    total, valid, errors = scores.total, scores.valid, scores.errors
    assert valid.tolist() == [False, True, True] and len(errors) == 1 and "samples [0]" in errors[0]
    torch.testing.assert_close(total[1:], images[1:].mean(dim=(1, 2, 3)) + 2.0)
    wrong_length = WeightedReward({"w": lambda i, p: torch.ones(len(p) + 1)}, {"w": 1.0})
    scores = wrong_length.score(images, ["x"] * 3)
    assert not scores.valid.any() and "shape" in scores.errors[0]
