"""examples/new_model_family.py, the "add a model family" worked example: its Z-Image adapter (outside the package)
makes a tiny stock ZImagePipeline a flowrl family like the shipped ones. ODE sampling through flowrl is the stock
pipeline's bit for bit (true CFG, prompts of different lengths, non-square), GRPO's first update is exactly
on-policy, and one LoRA step trains the LoRA weights and nothing else."""

import os
import sys

import pytest
import torch
from tiny import assert_on_policy_ratios_are_one, fit_one_iteration, randomize_lora, seed_options

import flowrl.policy.adapter as adapter_module
from flowrl.algorithms import GRPO
from flowrl.errors import ConfigError
from flowrl.policy import FlowMatchingPolicy
from flowrl.rewards import RewardSpec

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")
TWO = ["a red circle", "two blue squares on top of a cat"]  # different text lengths: the per-sample lists matter
PROMPTS = [TWO[0]] * 2 + [TWO[1]] * 2
ADV = torch.tensor([1.0, -1.0, 0.5, -0.5])
CFG = 4.0  # flowrl's scale: the stock pipeline's guidance_scale CFG - 1


@pytest.fixture(scope="module")
def example():
    """The example module, imported as tests/e2e/test_examples.py imports examples (examples/ on sys.path). Importing it
    registers ZImagePipeline; the registry is restored afterwards, so the other tests see the shipped families."""
    before = dict(adapter_module._ADAPTERS)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(EXAMPLES)
        try:
            import new_model_family

            yield new_model_family
        finally:
            adapter_module._ADAPTERS.clear()
            adapter_module._ADAPTERS.update(before)
            sys.modules.pop("new_model_family", None)


def make(example, finetune_type="lora", frozen_dtype="float32", **overrides):
    """GRPO on a freshly built tiny Z-Image (tests/tiny.py's make_module defaults: 16 px, 4 steps, groups of 2)."""
    policy = FlowMatchingPolicy(example.build_tiny_zimage_pipeline(), finetune_type=finetune_type, lora_rank=4,
                                frozen_dtype=frozen_dtype)
    args = dict(policy=policy, rewards=[RewardSpec("jpeg_incompressibility")], group_size=2, resolution=16,
                num_inference_steps=4, guidance_scale=CFG, train_batch_size=2)
    args.update(seed_options(**overrides))
    return GRPO(**args)


def test_ode_sampling_equals_the_stock_pipeline(example):
    """flowrl's all-ODE sample() from noise x is ZImagePipeline.__call__ from x, bit for bit in float32: the same
    sigmas, timestep input (1 - sigma), per-sample text lengths, sign of the prediction, CFG arithmetic (stock
    guidance_scale w = flowrl's scale - 1) and VAE scaling. Non-square, so a transposed height/width would show."""
    module = make(example, finetune_type="full")
    policy, h, w, n = module.policy, 16, 24, 4
    pipe = policy.pipeline  # the stock pipeline object holding the very same modules
    assert isinstance(policy.adapter, example.ZImageAdapter) and set(policy.frozen) == {"vae", "text_encoder"}
    x = policy.prepare_latents(2, h, w, torch.Generator().manual_seed(1))
    assert x.shape == (2, 4, 8, 12)
    ours = module.sampler.sample(TWO, h, w, n, CFG, torch.Generator().manual_seed(0), latents=x)
    call = dict(height=h, width=w, num_inference_steps=n, guidance_scale=CFG - 1, latents=x,
                max_sequence_length=policy.adapter.max_sequence_length)
    stock = pipe(list(TWO), output_type="latent", **call).images  # (a copy: the stock encoder edits the list)
    assert torch.equal(ours.sigmas, pipe.scheduler.sigmas.float())
    assert ours.sigmas.shape == (n + 1,) and ours.sigmas[0] == 1 and ours.sigmas[-1] == 0
    assert torch.equal(ours.final, stock)
    assert torch.equal(ours.images, pipe(list(TWO), output_type="pt", **call).images)
    # no guidance: flowrl's scale 1 is the stock guidance_scale 0 (one branch), and guidance really changed things
    plain = module.sampler.sample(TWO, h, w, n, 1.0, torch.Generator().manual_seed(0), latents=x)
    assert torch.equal(plain.final, pipe(list(TWO), output_type="latent", **{**call, "guidance_scale": 0.0}).images)
    assert (plain.final - ours.final).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="multiples of 4"):
        policy.check_resolution(18, 16)


@pytest.mark.parametrize("frozen_dtype", ["float32", "bfloat16"])
def test_grpo_on_policy_ratio_is_exactly_one(example, frozen_dtype):
    """Every rollout log-prob is recomputed bit for bit by the training pass (CFG batches of the negative prompt ""
    and prompts of other lengths), also with a bf16 frozen base under float32 LoRA."""
    module = make(example, frozen_dtype=frozen_dtype, clip_range=1e-2, noise_level=0.7)
    randomize_lora(module)
    rollout = module.rollout(PROMPTS)
    assert rollout.log_probs.dtype == torch.float32 and rollout.log_probs.shape == (4, 3)
    assert rollout.latents.shape[2:] == (4, 8, 8) and rollout.images.shape == (4, 3, 16, 16)
    assert_on_policy_ratios_are_one(module, rollout, ADV)


def test_one_lora_optimizer_step(example, prompt_file):
    """One Trainer.fit step trains LoRA on the attention projections of every block and leaves every other weight
    (the transformer's base, the VAE, the text encoder) bit for bit as it was."""
    module = make(example, noise_level=0.7, train_batch_size=4)
    trained = dict(module.policy.named_trainable_parameters())
    assert trained and all(".lora_" in n for n in trained)
    wrapped = {n.split(".lora_A", 1)[0].split("transformer.", 1)[1] for n in trained if ".lora_A" in n}
    assert {m.split(".", 2)[2] for m in wrapped} == set(example.ZImageAdapter.default_lora_targets)
    assert {m.split(".", 1)[0] for m in wrapped} == {"noise_refiner", "context_refiner", "layers"}
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    trainer = fit_one_iteration(module, prompt_file)
    assert trainer.global_step >= 1 and torch.isfinite(torch.as_tensor(trainer.logged_metrics["train/loss"]))
    after = dict(module.policy.named_parameters())
    assert after.keys() == before.keys()
    assert any(not torch.equal(after[n], before[n]) for n in trained)
    assert all(torch.equal(after[n], before[n]) for n in before if n not in trained)
