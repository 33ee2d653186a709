"""FLUX.1 on the tiny offline FluxPipeline (flowrl.policy.tiny.flux): dev (guidance embedding, distilled guidance)
and schnell (no guidance). flowrl's sampling must be the stock pipeline's, bit for bit in float32."""

import os

import pytest
import torch
from contract import FamilyContract
from diffusers import FluxPipeline
from tiny import assert_on_policy_ratios_are_one, fit_one_iteration, make_module, randomize_lora

from flowrl.algorithms import GRPO, NFT
from flowrl.errors import ConfigError
from flowrl.policy import FlowMatchingPolicy, PolicyConfig
from flowrl.policy.flux import FluxAdapter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPTS = ["a red circle"] * 2 + ["two blue squares"] * 2
ADV = torch.tensor([1.0, -1.0, 0.5, -0.5])
GUIDANCE = {"dev": 3.5, "schnell": 1.0}


@pytest.fixture(scope="session")
def flux_path(tiny_pipeline_path, tmp_path_factory):
    """``flux_path("dev")`` / ``flux_path("schnell")``: the tiny FLUX.1 of that variant, saved with save_pretrained."""
    from flowrl.policy.tiny.flux import build

    paths = {"dev": tiny_pipeline_path("flux")}

    def get(variant: str) -> str:
        if variant not in paths:
            path = tmp_path_factory.mktemp(f"tiny-flux-{variant}")
            build(guidance_embeds=variant == "dev").save_pretrained(path)
            paths[variant] = str(path)
        return paths[variant]

    return get


def make_flux(cls, path, variant="dev", **kw):
    return make_module(cls, path, **{"guidance_scale": GUIDANCE[variant], **kw})


# ---------------------------------------------------------------- (a) loading
@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_loading_selects_the_flux_adapter(flux_path, variant):
    policy = FlowMatchingPolicy.from_config(PolicyConfig(flux_path(variant), lora_rank=2))
    adapter = policy.adapter
    assert isinstance(policy.pipeline, FluxPipeline) and isinstance(adapter, FluxAdapter)
    assert adapter.guidance_mode == "distilled" and adapter.has_guidance_embedding == (variant == "dev")
    assert set(policy.frozen) == {"vae", "text_encoder", "text_encoder_2"}
    assert adapter.max_sequence_length == 16  # the tiny T5 tokenizer's model_max_length (real FLUX: 512)
    # LoRA on every default target, in the joint and in the single-stream blocks
    lora_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in policy.named_trainable_parameters() if ".lora_A" in n}
    assert "transformer.single_transformer_blocks.0.attn.to_q" in lora_modules
    assert {m.split("attn.", 1)[1] for m in lora_modules} == {t.split("attn.", 1)[1] for t in adapter.default_lora_targets}
    cond = policy.encode_prompt(["a red circle", "two blue squares"])
    assert cond["prompt_embeds"].shape == (2, 16, 32) and cond["pooled_projections"].shape == (2, 32)
    assert torch.equal(cond["txt_ids"], torch.zeros(16, 3)) and "txt_ids" in cond.shared
    x = policy.prepare_latents(2, 16, 24, torch.Generator().manual_seed(0))
    assert x.shape == (2, 4, 8, 12)  # unpacked (B, C, H/f, W/f): the VAE's layout
    v = policy.velocity(x, torch.tensor([0.9, 0.4]), cond, GUIDANCE[variant])
    assert v.shape == x.shape and v.dtype == torch.float32 and v.requires_grad
    images = policy.decode(x)
    assert images.shape == (2, 3, 16, 24) and images.dtype == torch.float32 and 0 <= images.min() <= images.max() <= 1
    assert policy.adapter.encode_images(images).shape == x.shape


# ---------------------------------------------------------------- (b) sampling = stock pipeline
@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_ode_sampling_equals_the_stock_pipeline(flux_path, variant):
    """flowrl's all-ODE sample() from noise x is FluxPipeline.__call__ from _pack_latents(x): same sigmas (linspace
    with the dynamic shift of the image token count), position ids, guidance input and 2x2 packing. Non-square,
    so a transposed height/width would show."""
    module = make_flux(GRPO, flux_path(variant), variant, policy=PolicyConfig(flux_path(variant), finetune_type="full"))
    policy, h, w, n = module.policy, 16, 24, 4
    x = policy.prepare_latents(2, h, w, torch.Generator().manual_seed(1))
    prompts = ["a red circle", "two blue squares"]
    ours = module.sampler.sample(prompts, h, w, n, GUIDANCE[variant], torch.Generator().manual_seed(0), latents=x)
    pipe = policy.pipeline  # the stock pipeline object holding the very same modules
    stock = pipe(prompts, height=h, width=w, num_inference_steps=n, guidance_scale=GUIDANCE[variant],
                 latents=policy.adapter.pack(x), max_sequence_length=16, output_type="latent").images
    assert torch.equal(ours.sigmas, pipe.scheduler.sigmas.float())
    assert ours.sigmas[0] == 1 and ours.sigmas[-1] == 0 and ours.sigmas.shape == (n + 1,)
    torch.testing.assert_close(policy.adapter.pack(ours.final), stock, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(policy.adapter.unpack(stock, h // 2, w // 2), ours.final, rtol=1e-5, atol=1e-5)
    if variant == "dev":  # the guidance scale really is an input of the denoiser
        other = module.sampler.sample(prompts, h, w, n, 1.0, torch.Generator().manual_seed(0), latents=x)
        assert not torch.allclose(other.final, ours.final)


# ---------------------------------------------------------------- (c-e) the families' contract, on FLUX.1-dev
class TestFluxContract(FamilyContract):
    family, guidance = "flux", GUIDANCE["dev"]

    def check_checkpointing(self, path, finetune_type, off, on, calls):
        assert calls == 2  # one joint and one single-stream block really ran checkpointed


def test_schnell_on_policy_ratio_is_exactly_one_and_full_finetuning_trains(flux_path, prompt_file):
    """FLUX.1-schnell (no guidance input) keeps the contract's exact ratios; a full fine-tuning step moves its
    whole transformer."""
    path = flux_path("schnell")
    module = make_flux(GRPO, path, "schnell", policy=PolicyConfig(path, lora_rank=4), clip_range=1e-2, noise_level=0.7)
    randomize_lora(module)
    assert_on_policy_ratios_are_one(module, module.rollout(PROMPTS), ADV)
    module = make_flux(GRPO, path, "schnell", policy=PolicyConfig(path, finetune_type="full"), noise_level=0.7,
                       train_batch_size=4)
    params = dict(module.policy.named_trainable_parameters())
    assert sum(p.numel() for p in params.values()) == sum(p.numel() for p in module.policy.transformer.parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    fit_one_iteration(module, prompt_file)
    assert any(not torch.equal(p, before[n]) for n, p in module.policy.named_trainable_parameters())


# ---------------------------------------------------------------- (f) bad input
def test_resolution_flux_cannot_make_is_refused_before_work(flux_path):
    with pytest.raises(ConfigError, match="multiples of 4.*set resolution"):
        make_flux(GRPO, flux_path("dev"), resolution=18)
    with pytest.raises(ConfigError, match="multiples of 4"):
        make_flux(GRPO, flux_path("dev"), eval={"resolution": [16, 22]})
    policy = FlowMatchingPolicy.from_pretrained(flux_path("dev"), lora_rank=2)
    policy.check_resolution(16, 24)  # fine
    with pytest.raises(ConfigError, match="multiples of 4"):
        policy.check_resolution(2, 16)


def test_guidance_scale_on_schnell_is_refused(flux_path):
    policy = FlowMatchingPolicy.from_pretrained(flux_path("schnell"), lora_rank=2)
    with pytest.raises(ConfigError, match="no guidance embedding.*guidance_scale: 1"):
        policy.adapter.check_guidance(3.5)
    policy.adapter.check_guidance(1.0)
    policy.adapter.check_guidance(None)
    cond = policy.encode_prompt(["a red circle"])
    x = policy.prepare_latents(1, 16, 16)
    with pytest.raises(ConfigError, match="guidance_scale: 1"):
        policy.velocity(x, 0.5, cond, 3.5)  # forward refuses too: no silent no-op guidance
    # through a trainer: refused at construction (sampling, eval and NFT's training guidance alike)
    with pytest.raises(ConfigError, match="FLUX.1-dev"):
        make_flux(GRPO, flux_path("schnell"), "schnell", guidance_scale=3.5, noise_level=0.7)
    with pytest.raises(ConfigError, match="FLUX.1-dev"):
        make_flux(GRPO, flux_path("schnell"), "schnell", noise_level=0.7, eval={"guidance_scale": 3.5})
    with pytest.raises(ConfigError, match="FLUX.1-dev"):
        make_flux(NFT, flux_path("schnell"), "schnell", train_guidance_scale=2.0)
    FlowMatchingPolicy.from_pretrained(flux_path("dev"), lora_rank=2).adapter.check_guidance(3.5)  # dev: fine


def test_lora_targets_that_match_nothing_and_too_long_text_are_refused(flux_path):
    with pytest.raises(ConfigError, match=r"match no module.*attn\.to_q"):
        FlowMatchingPolicy.from_pretrained(flux_path("dev"), target_modules=["attn.not_a_layer"])
    with pytest.raises(ConfigError, match="at most 512"):
        FlowMatchingPolicy.from_pretrained(flux_path("dev"), max_sequence_length=1024)


def test_export_round_trip_into_a_stock_flux_pipeline(tiny_pipeline_path, prompt_file, tmp_path, monkeypatch):
    """A LoRA trained by `flowrl fit` and written by `flowrl export` loads into a fresh stock FluxPipeline with
    `load_lora_weights` and gives flowrl's velocity there."""
    from test_export import assert_export_round_trip

    monkeypatch.chdir(tmp_path)
    assert_export_round_trip(tiny_pipeline_path("flux"), FluxPipeline, tmp_path, prompt_file,
                             config=os.path.join(ROOT, "lightning_configs", "flux", "grpo.yaml"))
