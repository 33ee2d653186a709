"""FLUX.1-Kontext on the tiny offline FluxKontextPipeline (flowrl.policy.tiny.flux_kontext): editing one condition
image. flowrl's sampling with a condition image must be the stock pipeline's."""

import os

import pytest
import torch
from contract import FamilyContract, condition_images, image_prompt_file
from diffusers import FluxKontextPipeline
from tiny import make_module

from flowrl.algorithms import GRPO
from flowrl.conditions import ConditionImages
from flowrl.conditions import to_pil_image as _to_pil
from flowrl.errors import ConfigError
from flowrl.policy import FlowMatchingPolicy, PolicyConfig
from flowrl.policy.flux_kontext import FluxKontextAdapter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GUIDANCE = 2.5  # FLUX.1-Kontext-dev's default guidance_scale
AREA = 16 * 24  # the condition images' own size: the stock pipeline with _auto_resize=False keeps it


@pytest.fixture()
def path(tiny_pipeline_path):
    return tiny_pipeline_path("flux_kontext")


def kontext(path, **kw):
    return FlowMatchingPolicy.from_config(PolicyConfig(path, lora_rank=2, condition_image_area=AREA, **kw))


def test_loading_selects_the_kontext_adapter_and_encodes_the_condition_image(path):
    policy = kontext(path)
    adapter = policy.adapter
    assert isinstance(policy.pipeline, FluxKontextPipeline) and isinstance(adapter, FluxKontextAdapter)
    assert adapter.condition_images == (0, 1) and adapter.guidance_mode == "distilled"
    image = condition_images(0)
    cond = policy.encode_prompt(["make it red"] * 2, [image, image], 16, 16)
    (latents, again) = cond["image_latents"]
    assert latents.shape == (4, 8, 12) and latents.dtype == torch.float32 and again is latents  # encoded once
    # the VAE posterior's mode, normalised by shift and scale, of the image as the stock processor prepares it
    processor, vae = policy.pipeline.image_processor, policy.pipeline.vae
    pixels = processor.preprocess(_to_pil(image[0]), 16, 24)
    expected = (vae.encode(pixels).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
    torch.testing.assert_close(latents, expected[0], rtol=0, atol=0)
    assert cond["condition"] == [image, image] and cond["condition_size"] == (16, 16)
    x = policy.prepare_latents(2, 16, 16, torch.Generator().manual_seed(0))
    v = policy.velocity(x, torch.tensor([0.9, 0.4]), cond, GUIDANCE)
    assert v.shape == x.shape and v.dtype == torch.float32
    # the image is seen: another image, another velocity; no image (text-to-image) runs too
    other = policy.encode_prompt(["make it red"] * 2, [condition_images(1)] * 2, 16, 16)
    assert not torch.allclose(policy.velocity(x, torch.tensor([0.9, 0.4]), other, GUIDANCE), v)
    text_only = policy.encode_prompt(["make it red"] * 2)
    assert "image_latents" not in text_only
    assert policy.velocity(x, torch.tensor([0.9, 0.4]), text_only, GUIDANCE).shape == x.shape


@pytest.mark.parametrize("size", [(16, 24), (24, 16)])
def test_ode_sampling_equals_the_stock_pipeline_with_the_condition_image(path, size):
    """flowrl's all-ODE sample() with a condition image is FluxKontextPipeline.__call__ with the same PIL image: the
    image's packed latents appended with position ids (1, i, j), the same sigmas (shifted by the generated tokens
    only), guidance input and unpacking. Non-square, so a transposed size would show."""
    module = make_module(GRPO, path, guidance_scale=GUIDANCE,
                         policy=PolicyConfig(path, finetune_type="full", condition_image_area=AREA))
    policy, h, w, n = module.policy, 16, 24, 4
    images = [condition_images(3, (3, *size)), condition_images(4, (3, *size))]
    x = policy.prepare_latents(2, h, w, torch.Generator().manual_seed(1))
    prompts = ["make it red", "add a hat"]
    ours = module.sampler.sample(prompts, h, w, n, GUIDANCE, torch.Generator().manual_seed(0), latents=x,
                                 conditions=images)
    pipe = policy.pipeline
    stock = pipe(prompt=prompts, image=[_to_pil(c[0]) for c in images], height=h, width=w, num_inference_steps=n,
                 guidance_scale=GUIDANCE, latents=policy.adapter.pack(x), max_sequence_length=16,
                 max_area=h * w, _auto_resize=False, output_type="latent").images
    assert torch.equal(ours.sigmas, pipe.scheduler.sigmas.float())
    torch.testing.assert_close(policy.adapter.pack(ours.final), stock, rtol=1e-5, atol=1e-5)
    plain = module.sampler.sample(prompts, h, w, n, GUIDANCE, torch.Generator().manual_seed(0), latents=x)
    assert not torch.allclose(plain.final, ours.final)  # the condition image changes the sample


def test_condition_size_is_the_stock_choice(path, monkeypatch):
    """Without ``condition_image_area`` the image goes to the stock pipeline's preferred Kontext resolution of the
    nearest aspect ratio (read from the size the stock call encodes, stopped before any transformer work)."""
    policy = FlowMatchingPolicy.from_pretrained(path, lora_rank=2)
    seen = []

    def capture(image, generator):
        seen.append(tuple(image.shape[-2:]))
        raise StopIteration

    monkeypatch.setattr(policy.pipeline, "_encode_vae_image", capture)
    for width, height in [(40, 24), (24, 40), (32, 32), (20, 60)]:
        image = condition_images(0, (3, height, width))
        with pytest.raises(StopIteration):
            policy.pipeline(prompt="x", image=_to_pil(image[0]), height=16, width=16, num_inference_steps=1,
                            max_sequence_length=16, output_type="latent")
        assert policy.adapter.condition_size(width, height) == seen[-1]
        assert max(seen[-1]) >= 672  # a real Kontext resolution, not the tiny image's


def test_samples_with_condition_images_of_different_sizes_batch_together(path):
    """A batch whose condition images differ in size runs in groups of equal size: each sample's velocity is the
    one it has alone."""
    policy = kontext(path)  # 16x24 and 24x16 images keep their size (AREA pixels at their own aspect ratio)
    images = [condition_images(5, (3, 16, 24)), condition_images(6, (3, 24, 16)), condition_images(7, (3, 16, 24))]
    cond = policy.encode_prompt(["a", "b", "c"], images, 16, 16)
    x = policy.prepare_latents(3, 16, 16, torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.9, 0.5, 0.2])
    with torch.no_grad():
        together = policy.velocity(x, sigma, cond, GUIDANCE)
        alone = torch.cat([policy.velocity(x[i:i + 1], sigma[i:i + 1], cond.select([i]), GUIDANCE) for i in range(3)])
    assert [tuple(z.shape) for z in cond["image_latents"]] == [(4, 8, 12), (4, 12, 8), (4, 8, 12)]
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


class TestFluxKontextContract(FamilyContract):
    family, guidance = "flux_kontext", GUIDANCE
    policy_options = {"condition_image_area": AREA}
    image_shape = (3, 16, 16)

    def conditions(self, prompts=None):
        prompts = self.prompts if prompts is None else prompts
        index = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        return [condition_images(10 + index[p]) for p in prompts]

    def training_prompts(self, prompt_file, directory):
        return image_prompt_file(directory, ["make it red", "add a hat"])

    def check_checkpointing(self, path, finetune_type, off, on, calls):
        assert calls == 2  # one joint and one single-stream block


def test_bad_condition_input_is_refused(path, tmp_path):
    policy = kontext(path)
    two = ConditionImages.from_tensors(torch.rand(2, 3, 16, 16))
    with pytest.raises(ConfigError, match="2 condition images.*takes 0 to 1"):
        policy.encode_prompt(["x"], [two], 16, 16)
    with pytest.raises(ConfigError, match="condition_image_area=100 is out of range"):
        PolicyConfig(path, condition_image_area=100)


def test_export_round_trip_into_a_stock_kontext_pipeline(tiny_pipeline_path, tmp_path, monkeypatch):
    """A LoRA trained by `flowrl fit` on an editing prompt file and written by `flowrl export` loads into a fresh
    stock FluxKontextPipeline with `load_lora_weights` and gives flowrl's velocity there."""
    from test_export import assert_export_round_trip

    monkeypatch.chdir(tmp_path)
    prompts = image_prompt_file(tmp_path, ["make it red", "add a hat"])
    assert_export_round_trip(tiny_pipeline_path("flux_kontext"), FluxKontextPipeline, tmp_path, prompts,
                             config=os.path.join(ROOT, "lightning_configs", "flux_kontext", "nft.yaml"),
                             extra_overrides=[f"--model.policy.condition_image_area={AREA}"])
