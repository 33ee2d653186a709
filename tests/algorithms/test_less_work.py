"""Less work for the same numbers: each shortcut against the plain path it replaces."""

import pytest
import torch
from tiny import fit_one_iteration, make_module

from flowrl.algorithms import GRPO
from flowrl.errors import ConfigError
from flowrl.policy import FlowMatchingPolicy, PolicyConfig


def _encoder_calls(policy) -> list[list[str]]:
    """The prompt lists ``policy``'s adapter is asked to encode, from now on."""
    seen = []
    original = policy.adapter.encode_prompt
    policy.adapter.encode_prompt = lambda prompts, device: seen.append(list(prompts)) or original(prompts, device)
    return seen


def test_each_distinct_prompt_is_encoded_once(tiny_sd3_path):
    policy = FlowMatchingPolicy.from_pretrained(tiny_sd3_path, finetune_type="lora", lora_rank=2)
    original = policy.adapter.encode_prompt
    seen = _encoder_calls(policy)
    prompts = ["a red circle"] * 3 + ["two blue squares"] * 3 + ["a red circle"]
    cond = policy.encode_prompt(prompts)
    assert seen == [["a red circle"], ["two blue squares"]]  # a group's prompt once, not G times; each on its own
    plain = original(prompts, policy.device)  # every sample encoded, as before
    for key in plain.tensors:
        torch.testing.assert_close(cond.tensors[key], plain.tensors[key], rtol=0, atol=1e-6)
    assert torch.equal(cond.tensors["prompt_embeds"][0], cond.tensors["prompt_embeds"][6])


@pytest.mark.parametrize("family", ["sd3", "flux", "qwen_image", "wan"])
def test_prompts_seen_before_come_from_the_cache_with_the_same_conditioning(tiny_pipeline_path, family):
    """A later batch encodes only its new prompts; its conditioning is a cache-less policy's encoding of the same
    batch bit for bit (every tensor, per-sample and shared field): a prompt's row does not depend on the prompts
    encoded beside it, so a resumed run, which starts with an empty cache, repeats the uninterrupted one."""
    from flowrl.policy.adapter import Conditioning

    path = tiny_pipeline_path(family)
    cached = FlowMatchingPolicy.from_pretrained(path, lora_rank=2)
    plain = FlowMatchingPolicy.from_pretrained(path, lora_rank=2, prompt_cache_mb=0)
    seen = _encoder_calls(cached)
    cached.encode_prompt(["a red circle", "two blue squares"])
    batch = ["a photo of a cat", "two blue squares", "a red circle", "a photo of a cat"]
    cond, want = cached.encode_prompt(batch), plain.encode_prompt(batch)
    assert seen == [["a red circle"], ["two blue squares"], ["a photo of a cat"]]
    assert isinstance(cond, Conditioning) and len(cond) == 4
    assert cond.tensors.keys() == want.tensors.keys() and cond.per_sample == want.per_sample
    for key in want.tensors:
        assert cond.tensors[key].dtype == want.tensors[key].dtype
        assert torch.equal(cond.tensors[key], want.tensors[key]), key
    for key, value in want.shared.items():
        assert torch.equal(cond.shared[key], value) if isinstance(value, torch.Tensor) else cond.shared[key] == value
    cached.encode_prompt(batch)  # everything known now: no encoder call
    assert len(seen) == 3 and cached.prompt_cache.hits >= 4


def test_a_rollout_from_cached_prompts_keeps_the_on_policy_ratios_exactly_one(tiny_sd3_path):
    from tiny import assert_on_policy_ratios_are_one, randomize_lora

    module = make_module(GRPO, tiny_sd3_path)
    randomize_lora(module)
    prompts = ["a red circle"] * 2 + ["two blue squares"] * 2
    module.rollout(prompts)  # the first iteration encodes them
    seen = _encoder_calls(module.policy)
    rollout = module.rollout(prompts)
    assert seen == [] and module.policy.prompt_cache.hits >= 2
    assert_on_policy_ratios_are_one(module, rollout, torch.tensor([1.0, -1.0, 0.5, -0.5]))


def test_the_prompt_cache_keeps_to_its_budget_least_recently_used_first(tiny_sd3_path):
    policy = FlowMatchingPolicy.from_pretrained(tiny_sd3_path, lora_rank=2)
    one = policy.encode_prompt(["a"])
    row_bytes = sum(t.numel() * t.element_size() for t in one.tensors.values())
    policy = FlowMatchingPolicy.from_pretrained(tiny_sd3_path, lora_rank=2, prompt_cache_mb=2.5 * row_bytes / 2**20)
    seen = _encoder_calls(policy)
    policy.encode_prompt(["a", "b"])
    policy.encode_prompt(["a"])  # "a" used last: "b" goes first
    policy.encode_prompt(["c"])
    assert len(policy.prompt_cache) == 2 and "b" not in policy.prompt_cache
    assert policy.prompt_cache.nbytes <= policy.prompt_cache.max_bytes
    policy.encode_prompt(["a", "c", "b"])
    assert seen == [["a"], ["b"], ["c"], ["b"]]
    off = FlowMatchingPolicy.from_pretrained(tiny_sd3_path, lora_rank=2, prompt_cache_mb=0)
    seen = _encoder_calls(off)
    off.encode_prompt(["a"])
    off.encode_prompt(["a"])
    assert seen == [["a"], ["a"]] and len(off.prompt_cache) == 0
    with pytest.raises(ConfigError, match="prompt_cache_mb"):
        PolicyConfig(tiny_sd3_path, prompt_cache_mb=-1)


def test_a_mode_switch_leaves_the_frozen_parts_in_eval_mode(tiny_sd3_path):
    policy = FlowMatchingPolicy.from_pretrained(tiny_sd3_path, lora_rank=2, lora_dropout=0.1)
    policy.train()
    assert policy.training and all(m.training for m in policy.transformer.modules())
    assert not any(m.training for m in policy.frozen.modules())
    policy.eval()
    assert not policy.training and not any(m.training for m in policy.modules())


def _grpo(path, reuse: bool, **overrides):
    module = make_module(GRPO, path, policy=PolicyConfig(path, finetune_type="full", uncond_gradient=False),
                         guidance_scale=3.0, clip_range=1e-2, **overrides)
    module.recomputes_rollout_velocities = reuse  # False: the plain path, the branch recomputed in training
    calls = []
    module.policy.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    return module, calls


@pytest.mark.parametrize("accumulation", [2, 1], ids=["one_step_per_iteration", "a_step_per_micro_batch"])
def test_grpo_reuses_the_rollouts_unconditional_branch_exactly(tiny_sd3_path, prompt_file, accumulation):
    """uncond_gradient: false: before the iteration's first update the training pass's unconditional branch is
    the rollout's; kept from the rollout, the update is bit for bit the plain one with fewer transformer calls."""
    results = {}
    for reuse in (False, True):
        torch.manual_seed(0)
        module, calls = _grpo(tiny_sd3_path, reuse, gradient_accumulation_steps=accumulation)
        before = {n: p.detach().clone() for n, p in module.policy.named_trainable_parameters()}
        fit_one_iteration(module, prompt_file)
        results[reuse] = ({n: p.detach().clone() for n, p in module.policy.named_trainable_parameters()}, len(calls))
    (plain, plain_calls), (reused, reused_calls) = results[False], results[True]
    assert plain.keys() == reused.keys() and all(torch.equal(plain[n], reused[n]) for n in plain)
    assert any(not torch.equal(plain[n], before[n]) for n in plain)  # an update was made
    # 4 samples in micro-batches of 2, 3 trained steps: one unconditional call per trained step and micro-batch
    # made before the first update is saved (both micro-batches with accumulation 2, the first one without)
    saved = 3 * (2 if accumulation == 2 else 1)
    assert plain_calls - reused_calls == saved


def test_no_reuse_where_it_would_not_be_exact(tiny_sd3_path):
    from callbacks import EMA, OffPolicySampling

    module, _ = _grpo(tiny_sd3_path, True)
    assert module.stores_uncond_velocity(3.0)
    assert not module.stores_uncond_velocity(1.0)  # no guidance, no unconditional branch
    module.policy.uncond_gradient = True  # the branch is part of the graph: one batched pass, nothing to keep
    assert not module.stores_uncond_velocity(3.0)
    module.policy.uncond_gradient = False

    class _Trainer:  # sampling with EMA weights: the rollout's branch is not the live weights'
        callbacks = [EMA(), OffPolicySampling(off_policy=True)]

    module._trainer = _Trainer()
    assert not module.stores_uncond_velocity(3.0)
    _Trainer.callbacks = [EMA(), OffPolicySampling(off_policy=False)]
    assert module.stores_uncond_velocity(3.0)
    module._trainer = None


def test_untrained_steps_in_wide_batches_keep_the_trained_steps_exact(tiny_sd3_path):
    """rollout_batch_size: the untrained (ODE) steps run 8 samples a pass instead of micro-batches of 2; the
    trained steps keep the micro-batches, so training still recomputes their log-probs bit for bit."""
    from tiny import assert_on_policy_ratios_are_one, randomize_lora

    prompts = ["a red circle"] * 4 + ["two blue squares"] * 4
    rollouts, calls = {}, {}
    for wide in (None, 8):
        module = make_module(GRPO, tiny_sd3_path, clip_range=1e-2, num_inference_steps=6, train_steps=[1, 3],
                             rollout_batch_size=wide)
        torch.manual_seed(0)
        randomize_lora(module)
        counted = []
        module.policy.transformer.register_forward_pre_hook(lambda *a, c=counted: c.append(1))
        rollouts[wide] = module.rollout(prompts)
        calls[wide] = len(counted)
    # 6 steps: micro-batch by micro-batch 4 x 6 passes; wide: 4 x 2 trained + 1 x 4 untrained
    assert (calls[None], calls[8]) == (24, 12)
    plain, wide = rollouts[None], rollouts[8]
    torch.testing.assert_close(wide.final, plain.final, rtol=0, atol=1e-5)  # other batch sizes, other last bits
    torch.testing.assert_close(wide.log_probs, plain.log_probs, rtol=0, atol=1e-5)
    assert_on_policy_ratios_are_one(module, wide, torch.tensor([1.0, -1.0] * 4))


def test_wide_rollout_batches_and_async_rewards_are_refused_together(tiny_sd3_path):
    from flowrl.errors import ConfigError

    with pytest.raises(ConfigError, match="rollout_batch_size: null or async_rewards: false"):
        make_module(GRPO, tiny_sd3_path, rollout_batch_size=8, async_rewards=True)
    with pytest.raises(ConfigError, match="rollout_batch_size"):
        make_module(GRPO, tiny_sd3_path, rollout_batch_size=0)
