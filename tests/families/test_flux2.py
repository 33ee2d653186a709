"""FLUX.2 on the tiny offline pipelines (flowrl.policy.tiny.flux2): klein base (``Flux2KleinPipeline``, true CFG, the
default tiny pipeline), step-distilled klein (no guidance) and dev (``Flux2Pipeline``, guidance embedding). flowrl's
sampling must be the stock pipeline's ``__call__``, its training exact on-policy, its LoRA loadable by stock
diffusers."""

import os

import pytest
import torch
from contract import FamilyContract
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from test_export import assert_export_round_trip
from tiny import assert_on_policy_ratios_are_one, fit_one_iteration, make_module, randomize_lora

from flowrl.algorithms import GRPO, NFT
from flowrl.errors import ConfigError
from flowrl.policy import Conditioning, FlowMatchingPolicy, PolicyConfig
from flowrl.policy.flux2 import Flux2Adapter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRPO_CONFIG = os.path.join(ROOT, "lightning_configs", "flux2", "grpo.yaml")
TWO = ["a red circle", "two blue squares"]
PROMPTS = [TWO[0]] * 2 + [TWO[1]] * 2
ADV = torch.tensor([1.0, -1.0, 0.5, -0.5])
VARIANTS = ["klein", "klein-distilled", "dev"]
#: the guidance each variant samples with (klein base: true CFG; dev: the embedded scale; distilled klein: none)
GUIDANCE = {"klein": 4.0, "klein-distilled": 1.0, "dev": 4.0}
PIPELINE = {"klein": Flux2KleinPipeline, "klein-distilled": Flux2KleinPipeline, "dev": Flux2Pipeline}
#: the tiny tokenizers' model_max_length (flowrl's default text length there; the real models' is 512)
TEXT_LENGTH = {"klein": 24, "klein-distilled": 24, "dev": 48}


@pytest.fixture(scope="session")
def flux2_path(tiny_pipeline_path, tmp_path_factory):
    """``flux2_path(variant)``: the tiny FLUX.2 of that variant, saved with save_pretrained (klein: the fixture's)."""
    from flowrl.policy.tiny.flux2 import build

    paths = {"klein": tiny_pipeline_path("flux2")}

    def get(variant: str) -> str:
        if variant not in paths:
            path = tmp_path_factory.mktemp(f"tiny-flux2-{variant}")
            kw = {"is_distilled": True} if variant == "klein-distilled" else {"variant": variant}
            build(**kw).save_pretrained(path)
            paths[variant] = str(path)
        return paths[variant]

    return get


def make_flux2(cls, path, variant="klein", **kw):
    return make_module(cls, path, **{"guidance_scale": GUIDANCE[variant], **kw})


def stock_latents(policy, final: torch.Tensor) -> torch.Tensor:
    """What the stock ``__call__`` returns for ``output_type="latent"`` from flowrl's final latents: dev the packed
    token sequence, klein the VAE's latents (batch norm undone, 2x2 patches unfolded)."""
    adapter, pipe = policy.adapter, policy.pipeline
    if not adapter.is_klein:
        return adapter.pack(final)
    mean, std = adapter._bn_stats()
    return pipe._unpatchify_latents(final * std + mean)


# ---------------------------------------------------------------- loading, conditioning, shapes
@pytest.mark.parametrize("variant", VARIANTS)
def test_loading_selects_the_flux2_adapter_and_conditions_as_the_stock_encoder(flux2_path, variant):
    policy = FlowMatchingPolicy.from_config(PolicyConfig(flux2_path(variant), lora_rank=2))
    adapter, pipe = policy.adapter, policy.pipeline
    assert type(pipe) is PIPELINE[variant] and isinstance(adapter, Flux2Adapter)
    assert adapter.is_klein == variant.startswith("klein")
    assert adapter.guidance_mode == ("cfg" if variant == "klein" else "distilled")
    assert adapter.embeds_guidance == (variant == "dev") and adapter.negative_prompt == ""
    assert set(policy.frozen) == {"vae", "text_encoder"}
    assert adapter.max_sequence_length == TEXT_LENGTH[variant]
    # LoRA on every default target: both kinds of block, the single-stream fused QKV + MLP projection included
    lora = {n.split(".lora_A", 1)[0] for n, _ in policy.named_trainable_parameters() if ".lora_A" in n}
    assert "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj" in lora
    assert {t for t in adapter.default_lora_targets if any(m.endswith("." + t) for m in lora)} == set(
        adapter.default_lora_targets)

    cond = policy.encode_prompt(TWO)
    length = adapter.max_sequence_length
    assert cond["prompt_embeds"].shape == (2, length, 48)  # three hidden states of 16 stacked
    assert set(cond.shared) == {"txt_ids"} and cond["txt_ids"].shape == (length, 4)
    for i, prompt in enumerate(TWO):  # each prompt encoded alone, as the stock encoder encodes it
        embeds, text_ids = pipe.encode_prompt([prompt], device="cpu", max_sequence_length=length)
        assert torch.equal(cond["prompt_embeds"][i], embeds[0]) and torch.equal(cond["txt_ids"], text_ids[0])
    batch, _ = pipe.encode_prompt(TWO, device="cpu", max_sequence_length=length)
    torch.testing.assert_close(cond["prompt_embeds"], batch, rtol=1e-5, atol=1e-6)
    # the prompt survives the chat template: the two prompts' embeddings differ, and so do they from the empty one
    null = policy.null_condition(1)
    assert not torch.allclose(cond["prompt_embeds"][0], cond["prompt_embeds"][1])
    assert not torch.allclose(cond["prompt_embeds"][0], null["prompt_embeds"][0])
    assert len(Conditioning.cat([null.expand(2), cond])) == 4

    x = policy.prepare_latents(2, 16, 24, torch.Generator().manual_seed(0))
    assert x.shape == (2, 16, 4, 6)  # (B, 4 * latent channels, H/2f, W/2f): the patchified, normalised grid
    packed = adapter.pack(x)
    ids = pipe._prepare_latent_ids(x)
    assert packed.shape == (2, 24, 16) and torch.equal(adapter.unpack(packed, 4, 6), x)
    assert torch.equal(pipe._unpack_latents_with_ids(packed, ids), x)  # the stock unpacking agrees
    assert torch.equal(adapter.image_ids(4, 6, x.device), ids[0])
    v = policy.velocity(x, torch.tensor([0.9, 0.4]), cond, GUIDANCE[variant])
    assert v.shape == x.shape and v.dtype == torch.float32 and v.requires_grad
    images = policy.decode(x)
    assert images.shape == (2, 3, 16, 24) and images.dtype == torch.float32 and 0 <= images.min() <= images.max() <= 1
    # images to latents as the stock pipeline encodes its reference images (mode, patchified, batch-normalised)
    with torch.no_grad():
        stock_z = pipe._encode_vae_image(images * 2 - 1, generator=None)
    torch.testing.assert_close(adapter.encode_images(images), stock_z, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- sampling = stock pipeline
@pytest.mark.parametrize("variant", VARIANTS)
def test_ode_sampling_equals_the_stock_pipeline(flux2_path, variant):
    """flowrl's all-ODE sample() from noise x is the stock ``__call__`` from the same x: same sigmas (FLUX.2's
    empirical mu of the token count and the step count), timestep and guidance inputs, text and image position ids,
    true CFG against "" (klein base), batch-norm and patch layout, VAE decoding. Non-square, so a transposed
    height/width would show. Within float32 rounding: flowrl encodes each prompt alone and runs the two CFG
    branches as one batch, the stock pipeline encodes the batch and runs the branches one after the other."""
    path = flux2_path(variant)
    module = make_flux2(GRPO, path, variant, policy=PolicyConfig(path, finetune_type="full"))
    policy, pipe, h, w, n = module.policy, module.policy.pipeline, 16, 24, 4
    x = policy.prepare_latents(2, h, w, torch.Generator().manual_seed(1))
    scale = GUIDANCE[variant]
    ours = module.sampler.sample(TWO, h, w, n, scale, torch.Generator().manual_seed(0), latents=x)
    # the step-distilled klein ignores any scale: the stock call at 4 is the unguided sampler
    call = dict(prompt=TWO, height=h, width=w, num_inference_steps=n, latents=x,
                guidance_scale=4.0 if variant == "klein-distilled" else scale,
                max_sequence_length=policy.adapter.max_sequence_length)
    stock = pipe(output_type="latent", **call).images
    assert torch.equal(ours.sigmas, pipe.scheduler.sigmas.float())
    assert ours.sigmas.shape == (n + 1,) and ours.sigmas[0] == 1 and ours.sigmas[-1] == 0
    torch.testing.assert_close(stock_latents(policy, ours.final), stock, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.images, pipe(output_type="pt", **call).images, rtol=1e-5, atol=1e-5)
    if variant != "klein-distilled":  # the guidance really acts (dev: an input; klein: the CFG branch)
        plain = module.sampler.sample(TWO, h, w, n, 1.0, torch.Generator().manual_seed(0), latents=x)
        assert (plain.final - ours.final).abs().max() > 1e-3
        stock_plain = pipe(output_type="latent", **{**call, "guidance_scale": 1.0}).images
        torch.testing.assert_close(stock_latents(policy, plain.final), stock_plain, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the families' contract, on FLUX.2-klein base
class TestFlux2Contract(FamilyContract):
    """True CFG 4 against the empty prompt: every rollout and training pass runs both branches."""

    family, guidance = "flux2", GUIDANCE["klein"]

    def check_checkpointing(self, path, finetune_type, off, on, calls):
        assert calls == 2  # one double- and one single-stream block really ran checkpointed


def test_dev_on_policy_ratio_is_exactly_one_and_full_finetuning_trains(flux2_path, prompt_file):
    """FLUX.2-dev (the guidance scale an input of the denoiser) keeps the contract's exact ratios, also with a bf16
    frozen base; a full fine-tuning step moves its whole transformer."""
    path = flux2_path("dev")
    for frozen_dtype in ("float32", "bfloat16"):
        policy = PolicyConfig(path, lora_rank=4, frozen_dtype=frozen_dtype)
        module = make_flux2(GRPO, path, "dev", policy=policy, clip_range=1e-2, noise_level=0.7)
        randomize_lora(module)
        assert_on_policy_ratios_are_one(module, module.rollout(PROMPTS), ADV)
    module = make_flux2(GRPO, path, "dev", policy=PolicyConfig(path, finetune_type="full"), noise_level=0.7,
                        train_batch_size=4)
    params = dict(module.policy.named_trainable_parameters())
    assert sum(p.numel() for p in params.values()) == sum(p.numel() for p in module.policy.transformer.parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    fit_one_iteration(module, prompt_file)
    assert any(not torch.equal(p, before[n]) for n, p in module.policy.named_trainable_parameters())


# ---------------------------------------------------------------- export: stock diffusers loads what flowrl trained
@pytest.mark.parametrize("variant, finetune_type", [("klein", "lora"), ("klein", "full"), ("dev", "lora")])
def test_export_round_trip_into_a_stock_flux2_pipeline(flux2_path, variant, finetune_type, prompt_file, tmp_path,
                                                       monkeypatch):
    """What `flowrl fit` trained and `flowrl export` wrote loads into a fresh stock pipeline (LoRA with
    `load_lora_weights`, full fine-tuning as a whole pipeline folder) and gives flowrl's velocity there."""
    monkeypatch.chdir(tmp_path)
    run = assert_export_round_trip(flux2_path(variant), PIPELINE[variant], tmp_path, prompt_file, config=GRPO_CONFIG,
                                   finetune_type=finetune_type)
    if finetune_type == "lora":
        assert set(run.info["target_modules"]) == set(Flux2Adapter.default_lora_targets)


# ---------------------------------------------------------------- bad input
def test_resolution_flux2_cannot_make_is_refused_before_work(flux2_path):
    with pytest.raises(ConfigError, match=r"FLUX.2 needs .*multiples of 4.*set resolution .*\[16, 16\]"):
        make_flux2(GRPO, flux2_path("klein"), resolution=18)
    with pytest.raises(ConfigError, match="multiples of 4"):
        make_flux2(GRPO, flux2_path("klein"), eval={"resolution": [16, 22]})
    policy = FlowMatchingPolicy.from_pretrained(flux2_path("klein"), lora_rank=2)
    policy.check_resolution(16, 24)  # fine
    with pytest.raises(ConfigError, match="multiples of 4"):
        policy.check_resolution(2, 16)


def test_guidance_on_the_step_distilled_klein_is_refused(flux2_path):
    """The stock pipeline ignores the scale of a step-distilled klein (a warning); flowrl refuses it instead of
    training with a guidance that does nothing."""
    policy = FlowMatchingPolicy.from_pretrained(flux2_path("klein-distilled"), lora_rank=2)
    with pytest.raises(ConfigError, match="takes no guidance.*guidance_scale: 1"):
        policy.adapter.check_guidance(4.0)
    policy.adapter.check_guidance(1.0)
    policy.adapter.check_guidance(None)
    cond = policy.encode_prompt(TWO[:1])
    x = policy.prepare_latents(1, 16, 16)
    with pytest.raises(ConfigError, match="guidance_scale: 1"):
        policy.velocity(x, 0.5, cond, 4.0)  # forward refuses too: no silent no-op guidance
    with pytest.raises(ConfigError, match="FLUX.2-klein-base"):  # through a trainer: refused at construction
        make_flux2(GRPO, flux2_path("klein-distilled"), "klein-distilled", guidance_scale=4.0, noise_level=0.7)
    with pytest.raises(ConfigError, match="FLUX.2-klein-base"):
        make_flux2(GRPO, flux2_path("klein-distilled"), "klein-distilled", noise_level=0.7,
                   eval={"guidance_scale": 4.0})
    with pytest.raises(ConfigError, match="FLUX.2-klein-base"):
        make_flux2(NFT, flux2_path("klein-distilled"), "klein-distilled", train_guidance_scale=2.0)
    for variant in ("klein", "dev"):  # true CFG and the embedded scale: any scale
        FlowMatchingPolicy.from_pretrained(flux2_path(variant), lora_rank=2).adapter.check_guidance(4.0)


@pytest.mark.parametrize("variant, template", [("klein", 13), ("dev", 32)])
def test_text_too_short_for_the_chat_template_is_refused(flux2_path, variant, template):
    """The chat template (dev: with its system message) comes before the prompt: a text length it fills would cut
    every prompt away and train on the template alone."""
    policy = FlowMatchingPolicy.from_pretrained(flux2_path(variant), lora_rank=2)
    assert policy.adapter.template_length() == template
    with pytest.raises(ConfigError, match=f"max_sequence_length={template}: .*takes {template} tokens.*at least"):
        FlowMatchingPolicy.from_pretrained(flux2_path(variant), lora_rank=2, max_sequence_length=template)
    shortest = FlowMatchingPolicy.from_pretrained(flux2_path(variant), lora_rank=2, max_sequence_length=template + 1)
    cond = shortest.encode_prompt(TWO)  # room for the prompts' first token at least: "a" and "two" differ
    assert cond["prompt_embeds"].shape[1] == template + 1
    assert not torch.allclose(cond["prompt_embeds"][0], cond["prompt_embeds"][1])


def test_lora_targets_that_match_nothing_and_frames_are_refused(flux2_path):
    with pytest.raises(ConfigError, match=r"match no module.*attn\.to_qkv_mlp_proj"):
        FlowMatchingPolicy.from_pretrained(flux2_path("klein"), target_modules=["attn.not_a_layer"])
    with pytest.raises(ValueError, match="images, not videos"):
        FlowMatchingPolicy.from_pretrained(flux2_path("klein"), num_frames=5)
