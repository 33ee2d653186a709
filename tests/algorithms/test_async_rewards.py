"""``async_rewards: true`` scores each micro-batch while the next samples: the same rewards and the same update
as scoring after sampling, and no scoring thread outlives an iteration, an exception or Ctrl-C."""

import threading
import time

import pytest
import torch
from tiny import fit_one_iteration, make_module

from flowrl.algorithms import GRPO
from flowrl.errors import ConfigError
from flowrl.rewards import RewardError, RewardSpec, WeightedReward
from flowrl.rewards.scoring import AsyncScorer


def reward_threads():
    return [t for t in threading.enumerate() if t.name.startswith("flowrl-reward")]


def fit_one(module, prompt_file):
    return fit_one_iteration(module, prompt_file, max_epochs=1, limit_train_batches=1)


def test_async_scoring_gives_the_same_rewards_and_update(tiny_sd3_path, prompt_file):
    rewards = [RewardSpec("jpeg_incompressibility"), RewardSpec("jpeg_compressibility", 0.5)]
    results = []
    for async_rewards in (False, True):
        torch.manual_seed(0)
        module = make_module(GRPO, tiny_sd3_path, rewards=rewards, async_rewards=async_rewards,
                             gradient_accumulation_steps=2)
        trainer = fit_one(module, prompt_file)
        params = {n: p.detach().clone() for n, p in module.policy.named_trainable_parameters()}
        results.append((float(trainer.logged_metrics["train/reward_mean"]), params,
                        {k: float(v) for k, v in trainer.logged_metrics.items() if k.startswith("train/reward_")}))
    (r_sync, p_sync, t_sync), (r_async, p_async, t_async) = results
    assert r_sync == r_async
    assert all(torch.equal(p_sync[n], p_async[n]) for n in p_sync)
    assert t_sync == t_async and "train/reward_jpeg_compressibility" in t_sync
    assert not reward_threads()


def test_scorer_matches_whole_batch_scoring(tiny_sd3_path):
    module = make_module(GRPO, tiny_sd3_path, train_batch_size=1)  # four micro-batches
    prompts = ["a red circle", "a red circle", "two blue squares", "two blue squares"]
    with AsyncScorer(module.reward_fn, prompts) as scorer:
        rollout = module.rollout(prompts, on_chunk=scorer.submit)
        scores = scorer.result()
    whole = module.reward_fn.score(rollout.images, prompts)
    torch.testing.assert_close(scores.total, whole.total, atol=0, rtol=0)
    assert all(torch.equal(scores.terms[k], whole.terms[k]) for k in whole.terms)
    assert scores.valid.all() and not scores.errors and not reward_threads()


def test_a_failing_reward_in_the_thread_stops_training_and_leaves_no_thread(tiny_sd3_path, prompt_file):
    def fails(images, prompts):
        raise RuntimeError("scorer crashed")

    module = make_module(GRPO, tiny_sd3_path, rewards=[fails], async_rewards=True)
    before = {n: p.detach().clone() for n, p in module.policy.named_trainable_parameters()}
    with pytest.raises(RewardError, match="scorer crashed"):
        fit_one(module, prompt_file)
    assert not reward_threads()
    assert all(torch.equal(p, before[n]) for n, p in module.policy.named_trainable_parameters())


def test_ctrl_c_while_a_micro_batch_is_being_scored_leaves_no_thread(tiny_sd3_path, monkeypatch):
    def slow(images, prompts):
        time.sleep(0.3)
        return torch.zeros(len(prompts))

    module = make_module(GRPO, tiny_sd3_path, rewards=[slow], train_batch_size=1)
    calls = {"n": 0}
    velocity = module.policy.velocity

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == module.num_inference_steps + 2:  # inside the second micro-batch: the first is scoring
            assert reward_threads()
            raise KeyboardInterrupt
        return velocity(*args, **kwargs)

    monkeypatch.setattr(module.policy, "velocity", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with AsyncScorer(module.reward_fn, ["a", "b", "c", "d"]) as scorer:
            module.rollout(["a", "b", "c", "d"], on_chunk=scorer.submit)
    assert not reward_threads()


def test_groupwise_rewards_are_refused_with_async_scoring(tiny_sd3_path):
    class Rank:
        groupwise = True

        def __call__(self, images, prompts):
            return torch.zeros(len(prompts))

    with pytest.raises(ConfigError, match="groupwise"):
        make_module(GRPO, tiny_sd3_path, rewards=WeightedReward({"rank": Rank()}, {"rank": 1.0}), async_rewards=True)
