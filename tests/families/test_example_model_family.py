"""examples/new_model_family.py, the "add a model family" worked example: its Lumina-Image 2.0 adapter (outside the
package) makes a tiny stock Lumina2Pipeline a flowrl family like the shipped ones. ODE sampling through flowrl is the
stock pipeline's (true CFG with its norm rescale, the bare negative prompt, prompts of different lengths,
non-square), GRPO's first update is exactly on-policy, and one LoRA step trains the LoRA weights and nothing else."""

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
TWO = ["a red circle", "two blue squares on top of a cat"]  # different text lengths: the masks matter
PROMPTS = [TWO[0]] * 2 + [TWO[1]] * 2
ADV = torch.tensor([1.0, -1.0, 0.5, -0.5])
CFG = 4.0  # flowrl's scale is Lumina2's guidance_scale as it is
SIZE = 32  # the pipeline's fixed VAE factor 8 x 2x2 patches: 32 px is a 4x4 latent, 2x2 tokens


@pytest.fixture(scope="module")
def example():
    """The example module, imported as tests/e2e/test_examples.py imports examples (examples/ on sys.path). Importing it
    registers Lumina2Pipeline; the registry is restored afterwards, so the other tests see the shipped families."""
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


def make(example, finetune_type="lora", frozen_dtype="float32", uncond_gradient=True, **overrides):
    """GRPO on a freshly built tiny Lumina2 (tests/tiny.py's make_module defaults, at 32 px: 4 steps, groups of 2)."""
    policy = FlowMatchingPolicy(example.build_tiny_lumina2_pipeline(), finetune_type=finetune_type, lora_rank=4,
                                frozen_dtype=frozen_dtype, uncond_gradient=uncond_gradient)
    args = dict(policy=policy, rewards=[RewardSpec("jpeg_incompressibility")], group_size=2, resolution=SIZE,
                num_inference_steps=4, guidance_scale=CFG, train_batch_size=2)
    args.update(seed_options(**overrides))
    return GRPO(**args)


def test_prompts_are_the_stock_pipelines_system_prompted_text_and_the_negative_is_bare(example):
    """The conditioning is the stock encode_prompt's, bit for bit: each prompt inside the system prompt, the
    negative prompt "" alone (just <bos>), all padded to 256 tokens with the attention mask."""
    policy = make(example).policy
    cond, null = policy.encode_prompt(TWO), policy.null_condition(2)
    embeds, mask, neg, neg_mask = policy.pipeline.encode_prompt(TWO, device="cpu")
    assert cond["prompt_embeds"].shape == (2, 256, 32) and torch.equal(cond["prompt_embeds"], embeds)
    assert torch.equal(cond["prompt_attention_mask"], mask) and torch.equal(null["prompt_embeds"], neg)
    assert torch.equal(null["prompt_attention_mask"], neg_mask) and neg_mask.sum(1).tolist() == [1, 1]
    lengths = mask.sum(1).tolist()
    assert 20 < lengths[0] < lengths[1]  # the system prompt is there, and the prompts' own lengths differ
    with pytest.raises(ConfigError, match="at most 512"):
        example.Lumina2Adapter(policy.pipeline, max_sequence_length=600)


def test_ode_sampling_equals_the_stock_pipeline(example):
    """flowrl's all-ODE sample() from noise x is Lumina2Pipeline.__call__ from x: the same sigmas (mu of the channel
    count), timestep input (1 - sigma), sign of the prediction, CFG with the norm rescale and VAE normalisation.
    Bit for bit when the CFG branches run as two passes as in __call__ (uncond_gradient false); to float rounding
    when flowrl batches them (the default: one pass whose rows of different text lengths are masked). Non-square,
    so a transposed height/width would show."""
    h, w, n = SIZE, SIZE + 16, 4
    module = make(example, finetune_type="full", uncond_gradient=False)
    policy = module.policy
    pipe = policy.pipeline  # the stock pipeline object holding the very same modules
    assert isinstance(policy.adapter, example.Lumina2Adapter) and set(policy.frozen) == {"vae", "text_encoder"}
    x = policy.prepare_latents(2, h, w, torch.Generator().manual_seed(1))
    assert x.shape == (2, 4, 4, 6)
    ours = module.sampler.sample(TWO, h, w, n, CFG, torch.Generator().manual_seed(0), latents=x)
    call = dict(height=h, width=w, num_inference_steps=n, guidance_scale=CFG, latents=x)
    stock = pipe(TWO, output_type="latent", **call).images
    assert torch.equal(ours.sigmas, pipe.scheduler.sigmas.float())
    assert ours.sigmas.shape == (n + 1,) and ours.sigmas[0] == 1 and ours.sigmas[-1] == 0
    assert torch.equal(ours.final, stock)
    assert torch.equal(ours.images, pipe(TWO, output_type="pt", **call).images)
    policy.uncond_gradient = True  # flowrl's default: [negative, prompt] in one batch
    batched = module.sampler.sample(TWO, h, w, n, CFG, torch.Generator().manual_seed(0), latents=x)
    torch.testing.assert_close(batched.final, stock, rtol=1e-5, atol=1e-5)
    # no guidance: one pass, bit for bit; and guidance really changed things
    plain = module.sampler.sample(TWO, h, w, n, 1.0, torch.Generator().manual_seed(0), latents=x)
    assert torch.equal(plain.final, pipe(TWO, output_type="latent", **{**call, "guidance_scale": 1.0}).images)
    assert (plain.final - ours.final).abs().max() > 1e-3
    # the quirks matter: mu of the image token count, or CFG without the norm rescale, would not be the stock sampler
    from diffusers.pipelines.lumina2.pipeline_lumina2 import calculate_shift

    pipe.scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=calculate_shift((h // 16) * (w // 16)))
    assert not torch.equal(pipe.scheduler.sigmas, ours.sigmas)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(example.Lumina2Adapter, "combine_guidance", adapter_module.ModelAdapter.combine_guidance)
        unscaled = module.sampler.sample(TWO, h, w, n, CFG, torch.Generator().manual_seed(0), latents=x)
    assert (unscaled.final - stock).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="multiples of 16"):
        policy.check_resolution(40, 32)


@pytest.mark.parametrize("frozen_dtype", ["float32", "bfloat16"])
def test_grpo_on_policy_ratio_is_exactly_one(example, frozen_dtype):
    """Every rollout log-prob is recomputed bit for bit by the training pass (CFG batches of the bare negative prompt
    and system-prompted prompts of other lengths), also with a bf16 frozen base under float32 LoRA."""
    module = make(example, frozen_dtype=frozen_dtype, clip_range=1e-2, noise_level=0.7)
    randomize_lora(module)
    rollout = module.rollout(PROMPTS)
    assert rollout.log_probs.dtype == torch.float32 and rollout.log_probs.shape == (4, 3)
    assert rollout.latents.shape[2:] == (4, 4, 4) and rollout.images.shape == (4, 3, SIZE, SIZE)
    assert_on_policy_ratios_are_one(module, rollout, ADV)


def test_one_lora_optimizer_step(example, prompt_file):
    """One Trainer.fit step trains LoRA on the attention projections of every block and leaves every other weight
    (the transformer's base, the VAE, the text encoder) bit for bit as it was."""
    module = make(example, noise_level=0.7, train_batch_size=4)
    trained = dict(module.policy.named_trainable_parameters())
    assert trained and all(".lora_" in n for n in trained)
    wrapped = {n.split(".lora_A", 1)[0].split("transformer.", 1)[1] for n in trained if ".lora_A" in n}
    assert {m.split(".", 2)[2] for m in wrapped} == set(example.Lumina2Adapter.default_lora_targets)
    assert {m.split(".", 1)[0] for m in wrapped} == {"noise_refiner", "context_refiner", "layers"}
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    trainer = fit_one_iteration(module, prompt_file)
    assert trainer.global_step >= 1 and torch.isfinite(torch.as_tensor(trainer.logged_metrics["train/loss"]))
    after = dict(module.policy.named_parameters())
    assert after.keys() == before.keys()
    assert any(not torch.equal(after[n], before[n]) for n in trained)
    assert all(torch.equal(after[n], before[n]) for n in before if n not in trained)
