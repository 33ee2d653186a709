"""Z-Image on the tiny offline ZImagePipeline (flowrl.policy.tiny.z_image): flowrl's sampling must be the stock
pipeline's bit for bit in float32 (per-sample text lengths, the negated prediction, the 1 - sigma timestep, the
stock CFG arithmetic), its training exact on-policy, its LoRA loadable by stock diffusers."""

import os

import pytest
import torch
from contract import FamilyContract
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
from tiny import make_module

from flowrl.algorithms import GRPO
from flowrl.errors import ConfigError
from flowrl.policy import Conditioning, FlowMatchingPolicy, PolicyConfig
from flowrl.policy.tiny.z_image import build
from flowrl.policy.z_image import ZImageAdapter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRPO_CONFIG = os.path.join(ROOT, "lightning_configs", "z_image", "grpo.yaml")
TWO = ["a red circle", "two blue squares on top of a cat"]  # different text lengths: the per-sample cut matters
CFG = 4.0  # flowrl's scale: the stock guidance_scale CFG - 1


@pytest.fixture(scope="module")
def z_path(tiny_pipeline_path):
    return tiny_pipeline_path("z_image")


def make_z(cls, path, **kw):
    return make_module(cls, path, **{"guidance_scale": CFG, **kw})


def stock_denoise(transformer, latents, sigma, cond):
    """Z-Image's transformer called as ZImagePipeline.__call__ calls it (not through flowrl's adapter): a list of
    (C, 1, H, W) latents, (1000 - t) / 1000, each prompt's unpadded embeddings; the output negated."""
    texts = [e[:n] for e, n in zip(cond["prompt_embeds"], cond["prompt_lengths"])]
    out = transformer(list(latents.unsqueeze(2).unbind(0)), (1000 - sigma * 1000) / 1000, texts, return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


# ---------------------------------------------------------------- loading, conditioning, shapes
def test_loading_selects_the_z_image_adapter(z_path):
    policy = FlowMatchingPolicy.from_config(PolicyConfig(z_path, lora_rank=2))
    adapter, pipe = policy.adapter, policy.pipeline
    assert isinstance(pipe, ZImagePipeline) and isinstance(adapter, ZImageAdapter)
    assert adapter.guidance_mode == "cfg" and adapter.negative_prompt == "" and adapter.max_sequence_length == 512
    assert set(policy.frozen) == {"vae", "text_encoder"}
    for (n, a), b in zip(pipe.vae.state_dict().items(), build(seed=0).vae.state_dict().values()):
        assert torch.equal(a, b), n  # the saved weights came back
    # LoRA on every default target in the three kinds of block (noise refiner, context refiner, main layers)
    lora = {n.split(".lora_A", 1)[0].split("transformer.", 1)[1] for n, _ in policy.named_trainable_parameters()
            if ".lora_A" in n}
    assert {m.split(".", 2)[2] for m in lora} == set(adapter.default_lora_targets)
    assert {m.split(".", 1)[0] for m in lora} == {"noise_refiner", "context_refiner", "layers"}

    cond = policy.encode_prompt(TWO)
    stock, _ = pipe.encode_prompt(list(TWO), device="cpu", do_classifier_free_guidance=False)
    lengths = [len(e) for e in stock]
    assert cond["prompt_embeds"].shape == (2, 512, 32) and cond["prompt_lengths"] == lengths
    assert lengths[0] < lengths[1]
    for row, n, e in zip(cond["prompt_embeds"], lengths, stock):
        assert torch.equal(row[:n], e) and not row[n:].any()  # the stock embeddings, zero-padded
    null = policy.null_condition(2)  # the negative prompt "": the chat template around nothing
    both = Conditioning.cat([null, cond.select([1, 0])])
    assert len(both) == 4 and both["prompt_lengths"] == null["prompt_lengths"] + lengths[::-1]
    assert both["prompt_embeds"].shape == (4, 512, 32)
    assert [t.shape for t in adapter.text_inputs(cond, torch.float32)] == [(n, 32) for n in lengths]

    x = policy.prepare_latents(2, 16, 24, torch.Generator().manual_seed(0))
    assert x.shape == (2, 4, 8, 12)  # (B, C, H/f, W/f); the transformer gets (C, 1, H/f, W/f) per sample
    sigma = torch.tensor([0.9, 0.4])
    v = policy.velocity(x, sigma, cond, CFG)
    assert v.shape == x.shape and v.dtype == torch.float32 and v.requires_grad
    with torch.no_grad():  # the policy's velocity is the stock call's, negated prediction included
        torch.testing.assert_close(policy.velocity(x, sigma, cond, 1.0), stock_denoise(policy.transformer, x, sigma,
                                                                                          cond), rtol=0, atol=0)
        # a sample alone gives what it gets in a batch with a longer prompt (the transformer masks the padding)
        alone = policy.velocity(x[:1], sigma[:1], cond.select([0]), CFG)
    torch.testing.assert_close(alone, v[:1].detach(), rtol=1e-5, atol=1e-6)
    images = policy.decode(x)
    assert images.shape == (2, 3, 16, 24) and images.dtype == torch.float32 and 0 <= images.min() <= images.max() <= 1
    assert adapter.encode_images(images).shape == x.shape


# ---------------------------------------------------------------- sampling = stock pipeline
@pytest.mark.parametrize("scheduler", ["turbo", "dynamic-shift"])
def test_ode_sampling_equals_the_stock_pipeline(z_path, scheduler):
    """flowrl's all-ODE sample() from noise x is ZImagePipeline.__call__ from x, bit for bit in float32: the same
    sigmas (Turbo's fixed shift, or a dynamic shift of the image token count), timestep input, per-sample text
    lengths, sign of the prediction, CFG arithmetic (stock guidance_scale w = flowrl's scale - 1) and VAE
    normalisation. Non-square, so a transposed height/width would show."""
    module = make_z(GRPO, z_path, policy=PolicyConfig(z_path, finetune_type="full"))
    policy, h, w, n = module.policy, 16, 24, 4
    pipe = policy.pipeline  # the stock pipeline object holding the very same modules
    if scheduler == "dynamic-shift":
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=4,
                                                         max_image_seq_len=64, base_shift=0.5, max_shift=1.15)
    x = policy.prepare_latents(2, h, w, torch.Generator().manual_seed(1))
    ours = module.sampler.sample(TWO, h, w, n, CFG, torch.Generator().manual_seed(0), latents=x)
    call = dict(height=h, width=w, num_inference_steps=n, guidance_scale=CFG - 1, latents=x,
                max_sequence_length=policy.adapter.max_sequence_length)
    stock = pipe(list(TWO), output_type="latent", **call).images
    assert torch.equal(ours.sigmas, pipe.scheduler.sigmas.float())
    assert ours.sigmas.shape == (n + 1,) and ours.sigmas[0] == 1 and ours.sigmas[-1] == 0
    assert torch.equal(ours.final, stock)
    assert torch.equal(ours.images, pipe(list(TWO), output_type="pt", **call).images)
    # no guidance (Z-Image-Turbo): flowrl's scale 1 is the stock guidance_scale 0, one pass per step
    plain = module.sampler.sample(TWO, h, w, n, 1.0, torch.Generator().manual_seed(0), latents=x)
    assert torch.equal(plain.final, pipe(list(TWO), output_type="latent", **{**call, "guidance_scale": 0.0}).images)
    assert (plain.final - ours.final).abs().max() > 1e-3  # guidance really changed the samples
    if scheduler == "dynamic-shift":  # the shift follows the image token count, as __call__'s mu does
        assert not torch.equal(policy.sigmas(n, 32, 32), ours.sigmas)


# ---------------------------------------------------------------- the families' contract
class TestZImageContract(FamilyContract):
    """True CFG batches [negative, prompt] whose texts have different lengths (the base model's way; Turbo samples
    with guidance 1, a single branch)."""

    family, guidance = "z_image", CFG

    def check_checkpointing(self, path, finetune_type, off, on, calls):
        assert calls == 3  # the noise refiner, context refiner and main block each ran checkpointed, CFG batched


# ---------------------------------------------------------------- bad input
def test_resolution_z_image_cannot_make_is_refused_before_work(z_path):
    with pytest.raises(ConfigError, match=r"multiples of 4.*set resolution .*\[16, 16\]"):
        make_z(GRPO, z_path, resolution=18)
    with pytest.raises(ConfigError, match="multiples of 4"):
        make_z(GRPO, z_path, eval={"resolution": [16, 22]})
    with pytest.raises(ConfigError, match=r"RoPE covers at most 32x32 tokens .*at most \[128, 128\]"):
        make_z(GRPO, z_path, resolution=[16, 132])  # the tiny transformer's axes_lens: 32 tokens a side
    policy = FlowMatchingPolicy.from_pretrained(z_path, lora_rank=2)
    policy.check_resolution(128, 16)  # fine: the largest it can make
    with pytest.raises(ConfigError, match="multiples of 4"):
        policy.check_resolution(2, 16)


def test_text_length_past_the_rope_table_is_refused(z_path):
    """The text is padded to a multiple of 32 and the image placed after it on the RoPE's first axis (1024 long in
    the tiny transformer): 992 tokens run, one more would index past the table (a device-side assert on a GPU)."""
    with pytest.raises(ConfigError, match="max_sequence_length=993.*allow 1 to 992 tokens"):
        FlowMatchingPolicy.from_pretrained(z_path, max_sequence_length=993)
    policy = FlowMatchingPolicy.from_pretrained(z_path, finetune_type="full", max_sequence_length=992)
    cond = policy.encode_prompt(["red " * 1200])  # truncated to 992 tokens
    assert cond["prompt_lengths"] == [992]
    x, sigma = policy.prepare_latents(1, 16, 16), torch.tensor([0.5])
    with torch.no_grad():
        assert torch.isfinite(policy.velocity(x, sigma, cond)).all()  # the longest text fits
        embeds = cond["prompt_embeds"]
        longer = Conditioning({"prompt_embeds": torch.cat([embeds, embeds[:, :1]], 1)}, {"prompt_lengths": [993]})
        with pytest.raises(IndexError):  # what the check spares a user: the stock transformer past its table
            policy.adapter.forward(policy.transformer, x, sigma, longer)


def test_lora_targets_that_match_nothing_are_refused(z_path):
    with pytest.raises(ConfigError, match=r"match no module.*attention\.to_q.*feed_forward\.w1"):
        FlowMatchingPolicy.from_pretrained(z_path, target_modules=["attn.to_q"])


# ---------------------------------------------------------------- export: stock diffusers loads what flowrl trained
@pytest.mark.parametrize("finetune_type", ["lora", "full"])
def test_export_round_trip_into_a_stock_z_image_pipeline(z_path, finetune_type, prompt_file, tmp_path, monkeypatch):
    """A LoRA (or a whole transformer) trained by `flowrl fit` and written by `flowrl export` loads into a fresh stock
    ZImagePipeline (`load_lora_weights`, or `from_pretrained`) and, called as the stock pipeline calls it, gives
    flowrl's velocity there."""
    from test_export import assert_export_round_trip

    monkeypatch.chdir(tmp_path)
    run = assert_export_round_trip(z_path, ZImagePipeline, tmp_path, prompt_file, config=GRPO_CONFIG,
                                   finetune_type=finetune_type, denoise=stock_denoise)
    if finetune_type == "lora":
        assert set(run.info["target_modules"]) == set(ZImageAdapter.default_lora_targets)
