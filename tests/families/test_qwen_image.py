"""Qwen-Image on the tiny offline QwenImagePipeline (flowrl.policy.tiny.qwen_image): flowrl's sampling must be the
stock pipeline's (true CFG with the norm rescale, dynamic-shift sigmas, packing, text masks), its training exact
on-policy, its LoRA loadable by stock diffusers."""

import os

import pytest
import torch
from contract import FamilyContract
from diffusers import QwenImagePipeline
from test_export import assert_export_round_trip
from tiny import make_module

from flowrl.algorithms import GRPO
from flowrl.errors import ConfigError
from flowrl.policy import Conditioning, FlowMatchingPolicy, PolicyConfig
from flowrl.policy.adapter import ModelAdapter
from flowrl.policy.qwen_image import QwenImageAdapter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRPO_CONFIG = os.path.join(ROOT, "lightning_configs", "qwen_image", "grpo.yaml")
TWO = ["a red circle", "two blue squares on top of a cat"]  # different text lengths: the masks matter
PROMPTS = [TWO[0]] * 2 + [TWO[1]] * 2
ADV = torch.tensor([1.0, -1.0, 0.5, -0.5])
CFG = 4.0


@pytest.fixture(scope="session")
def qwen_path(tiny_pipeline_path):
    return tiny_pipeline_path("qwen_image")


def make_qwen(cls, path, **kw):
    return make_module(cls, path, **{"guidance_scale": CFG, **kw})


# ---------------------------------------------------------------- loading, conditioning, shapes
def test_loading_selects_the_qwen_image_adapter(qwen_path):
    policy = FlowMatchingPolicy.from_config(PolicyConfig(qwen_path, lora_rank=2))
    adapter, pipe = policy.adapter, policy.pipeline
    assert isinstance(pipe, QwenImagePipeline) and isinstance(adapter, QwenImageAdapter)
    assert adapter.guidance_mode == "cfg" and adapter.negative_prompt == " " and adapter.max_sequence_length == 512
    assert set(policy.frozen) == {"vae", "text_encoder"}
    lora = {n.split(".lora_A", 1)[0] for n, _ in policy.named_trainable_parameters() if ".lora_A" in n}
    assert {m.split("transformer_blocks.0.", 1)[1] for m in lora} == set(adapter.default_lora_targets)
    # The tiny tokenizer splits the template's system part into as many tokens as the real Qwen2.5-VL one, so the
    # stock pipeline's drop index leaves exactly the user prompt and the assistant suffix.
    prefix, suffix = pipe.prompt_template_encode.split("{}")
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    ids = pipe.tokenizer(pipe.prompt_template_encode.format(TWO[0])).input_ids[34:]
    assert pipe.tokenizer.decode(ids) == TWO[0] + suffix

    cond = policy.encode_prompt(TWO)
    stock, stock_mask = pipe.encode_prompt(TWO, device="cpu")
    n = stock.shape[1]
    lengths = stock_mask.sum(1).tolist()
    assert cond["prompt_embeds"].shape == (2, 512, 32) and cond["prompt_embeds_mask"].shape == (2, 512)
    assert cond["txt_seq_lens"] == lengths and lengths[0] < lengths[1] == n
    assert torch.equal(cond["prompt_embeds"][:, :n], stock) and not cond["prompt_embeds"][:, n:].any()
    assert torch.equal(cond["prompt_embeds_mask"][:, :n], stock_mask) and not cond["prompt_embeds_mask"][:, n:].any()
    null = policy.null_condition(2)  # the negative prompt " ": shorter than both prompts
    both = Conditioning.cat([null, cond.select([1, 0])])
    assert len(both) == 4 and both["txt_seq_lens"] == null["txt_seq_lens"] + lengths[::-1]
    assert both["prompt_embeds"].shape == (4, 512, 32)

    x = policy.prepare_latents(2, 16, 24, torch.Generator().manual_seed(0))
    assert x.shape == (2, 4, 8, 12)  # (B, C, H/f, W/f): the VAE's layout without its frame axis
    assert torch.equal(adapter.unpack(adapter.pack(x), 8, 12), x) and adapter.pack(x).shape == (2, 24, 16)
    sigma = torch.tensor([0.9, 0.4])
    v = policy.velocity(x, sigma, cond, CFG)
    assert v.shape == x.shape and v.dtype == torch.float32 and v.requires_grad
    with torch.no_grad():  # a sample alone (its own text length, no mask) gives what it gets in the padded batch
        alone = policy.velocity(x[:1], sigma[:1], cond.select([0]), CFG)
    torch.testing.assert_close(alone, v[:1].detach(), rtol=1e-5, atol=1e-6)
    # the norm rescale: every packed token of the guided velocity has the conditional one's norm
    with torch.no_grad():
        v_c, v_u = policy.velocity(x, sigma, cond, 1.0), policy.velocity(x, sigma, null, 1.0)
    g = adapter.combine_guidance(v_u, v_c, CFG)
    torch.testing.assert_close(adapter.pack(g).norm(dim=-1), adapter.pack(v_c).norm(dim=-1))
    assert not torch.allclose(g, ModelAdapter.combine_guidance(adapter, v_u, v_c, CFG))
    images = policy.decode(x)
    assert images.shape == (2, 3, 16, 24) and images.dtype == torch.float32 and 0 <= images.min() <= images.max() <= 1
    assert adapter.encode_images(images).shape == x.shape


# ---------------------------------------------------------------- sampling = stock pipeline
def test_ode_sampling_equals_the_stock_pipeline(qwen_path, monkeypatch):
    """flowrl's all-ODE sample() from noise x is QwenImagePipeline.__call__ from pack(x) with true CFG against the
    negative prompt: same sigmas (dynamic shift of the token count, shift_terminal), timestep input, text masks, CFG
    norm rescale, 2x2 packing and VAE normalisation. Non-square, so a transposed height/width would show."""
    module = make_qwen(GRPO, qwen_path, policy=PolicyConfig(qwen_path, finetune_type="full"))
    policy, h, w, n = module.policy, 16, 24, 4
    x = policy.prepare_latents(2, h, w, torch.Generator().manual_seed(1))
    ours = module.sampler.sample(TWO, h, w, n, CFG, torch.Generator().manual_seed(0), latents=x)
    pipe = policy.pipeline  # the stock pipeline object holding the very same modules
    call = dict(negative_prompt=[" "] * 2, true_cfg_scale=CFG, height=h, width=w, num_inference_steps=n)
    stock = pipe(TWO, latents=policy.adapter.pack(x), output_type="latent", **call).images
    assert torch.equal(ours.sigmas, pipe.scheduler.sigmas.float())
    assert ours.sigmas.shape == (n + 1,) and ours.sigmas[0] == 1 and ours.sigmas[-1] == 0
    assert ours.sigmas[-2] == pytest.approx(0.02, abs=1e-6)  # Qwen-Image's shift_terminal
    torch.testing.assert_close(policy.adapter.pack(ours.final), stock, rtol=1e-5, atol=1e-5)
    stock_images = pipe(TWO, latents=policy.adapter.pack(x), output_type="pt", **call).images
    torch.testing.assert_close(ours.images, stock_images, rtol=1e-5, atol=1e-5)
    # no guidance (the stock pipeline without a negative prompt), prompts of one length (no text mask)
    same = [TWO[1]] * 2
    plain = module.sampler.sample(same, h, w, n, 1.0, torch.Generator().manual_seed(0), latents=x)
    stock_plain = pipe(same, latents=policy.adapter.pack(x), output_type="latent", height=h, width=w,
                       num_inference_steps=n, true_cfg_scale=1.0).images
    torch.testing.assert_close(policy.adapter.pack(plain.final), stock_plain, rtol=1e-5, atol=1e-5)
    # without the norm rescale flowrl would not be the stock sampler
    monkeypatch.setattr(QwenImageAdapter, "combine_guidance", ModelAdapter.combine_guidance)
    plain = module.sampler.sample(TWO, h, w, n, CFG, torch.Generator().manual_seed(0), latents=x)
    assert (policy.adapter.pack(plain.final) - stock).abs().max() > 1e-3


# ---------------------------------------------------------------- the families' contract
class TestQwenImageContract(FamilyContract):
    """CFG batches [negative, prompt] of different text lengths; Flow-GRPO's Qwen-Image noise level 1.2."""

    family, guidance, noise_level, prompts = "qwen_image", CFG, 1.2, PROMPTS

    def check_checkpointing(self, path, finetune_type, off, on, calls):
        assert calls == 1  # the one block really ran checkpointed
        if finetune_type == "lora":  # the last block's text output is never read: only its text-out path has no grad
            policy = FlowMatchingPolicy.from_pretrained(path, finetune_type="lora", lora_rank=2)
            dead = {n for n, _ in policy.named_trainable_parameters()} - set(off)
            assert dead and all(".txt_mlp." in n or ".attn.to_add_out." in n for n in dead), dead


# ---------------------------------------------------------------- export: stock diffusers loads what flowrl trained
@pytest.mark.parametrize("finetune_type", ["lora", "full"])
def test_export_round_trip(qwen_path, finetune_type, prompt_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = assert_export_round_trip(qwen_path, QwenImagePipeline, tmp_path, prompt_file, config=GRPO_CONFIG,
                                   finetune_type=finetune_type)
    if finetune_type == "lora":
        assert set(run.info["target_modules"]) == set(QwenImageAdapter.default_lora_targets)


# ---------------------------------------------------------------- bad input
def test_resolution_qwen_image_cannot_make_is_refused_before_work(qwen_path):
    with pytest.raises(ConfigError, match=r"multiples of 4.*set resolution .*\[16, 16\]"):
        make_qwen(GRPO, qwen_path, resolution=18)
    with pytest.raises(ConfigError, match="multiples of 4"):
        make_qwen(GRPO, qwen_path, eval={"resolution": [16, 22]})
    policy = FlowMatchingPolicy.from_pretrained(qwen_path, lora_rank=2)
    policy.check_resolution(16, 24)  # fine
    with pytest.raises(ConfigError, match="multiples of 4"):
        policy.check_resolution(2, 16)


def test_lora_targets_that_match_nothing_and_too_long_text_are_refused(qwen_path):
    with pytest.raises(ConfigError, match=r"match no module.*img_mlp\.net\.2"):
        FlowMatchingPolicy.from_pretrained(qwen_path, target_modules=["attn.not_a_layer"])
    with pytest.raises(ConfigError, match="at most 1024"):
        FlowMatchingPolicy.from_pretrained(qwen_path, max_sequence_length=2048)
    with pytest.raises(ValueError, match="images, not videos"):
        FlowMatchingPolicy.from_pretrained(qwen_path, num_frames=5)
