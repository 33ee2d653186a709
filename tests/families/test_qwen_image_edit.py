"""Qwen-Image-Edit and Qwen-Image-Edit-Plus (2509 / 2511) on the tiny offline pipelines
(flowrl.policy.tiny.qwen_image_edit): flowrl's sampling with condition images must be the stock pipelines' (the VL
encoder seeing the images in the prompt, the images' VAE latents appended to the generated tokens, the true CFG
with the negative prompt and the same images, norm-rescaled), its training exact on-policy, its LoRA loadable by
stock diffusers.

The stock pipelines resize condition images to 1024 x 1024 pixels for the VAE; here ``policy.condition_image_area``
makes it 32 x 32 and :func:`stock_area_patches` patches the stock constant to the same value, so the comparisons
with the stock call stay exact (one test checks the stock size itself, unpatched)."""

import importlib.util
import json
import os
import shutil

import pytest
import torch
from contract import FamilyContract, condition_images, image_prompt_file
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from tiny import fit_one_iteration, make_module

from flowrl.algorithms import GRPO
from flowrl.conditions import ConditionImages
from flowrl.conditions import to_pil_image as _to_pil
from flowrl.errors import ConfigError
from flowrl.policy import FlowMatchingPolicy, PolicyConfig
from flowrl.policy.qwen_image_edit import QwenImageEditAdapter, QwenImageEditPlusAdapter
from flowrl.policy.tiny.qwen_image_edit import build, stock_area_patches

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NFT_CONFIG = os.path.join(ROOT, "lightning_configs", "qwen_image_edit", "nft.yaml")
AREA = 32 * 32  # the condition images' VAE size here (the stock 1024 x 1024 would be 65k tokens of the tiny VAE)
CFG = 4.0  # the model cards' true_cfg_scale


@pytest.fixture(scope="session")
def edit_path(tiny_pipeline_path):
    return tiny_pipeline_path("qwen_image_edit")


@pytest.fixture(scope="session")
def plus_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen-image-edit-plus")
    build(plus=True).save_pretrained(path)
    return str(path)


@pytest.fixture()
def stock_at_area(monkeypatch):
    """The stock pipelines resize condition images for the VAE to ``AREA`` pixels, as flowrl with
    ``condition_image_area=AREA``."""
    for obj, name, value in stock_area_patches(AREA):
        monkeypatch.setattr(obj, name, value)


def image(seed: int, size=(3, 16, 24)) -> torch.Tensor:
    """A random 8-bit RGB image of ``size`` as a (3, H, W) tensor (values k / 255, as read from a PNG)."""
    return condition_images(seed, size)[0]


def edit_policy(path, **kw):
    return FlowMatchingPolicy.from_config(PolicyConfig(path, lora_rank=2, condition_image_area=AREA, **kw))


VARIANTS = {"edit": (QwenImageEditPipeline, QwenImageEditAdapter), "plus": (QwenImageEditPlusPipeline,
                                                                            QwenImageEditPlusAdapter)}


@pytest.fixture(params=sorted(VARIANTS))
def variant(request, edit_path, plus_path):
    """``(name, tiny pipeline path)`` of each variant."""
    return request.param, {"edit": edit_path, "plus": plus_path}[request.param]


# ---------------------------------------------------------------- loading, conditioning
def test_loading_selects_the_adapter_and_encodes_prompts_with_their_images(variant):
    name, path = variant
    policy = edit_policy(path)
    pipe, adapter = policy.pipeline, policy.adapter
    pipeline_class, adapter_class = VARIANTS[name]
    assert type(pipe) is pipeline_class and type(adapter) is adapter_class
    assert adapter.condition_images == ((1, 1) if name == "edit" else (1, 3))
    assert adapter.guidance_mode == "cfg" and adapter.negative_prompt == " " and adapter.max_sequence_length is None
    assert set(policy.frozen) == {"vae", "text_encoder"} and adapter.condition_image_area == AREA
    assert pipe.transformer.config.zero_cond_t == (name == "plus")  # the tiny Plus is a 2511
    # the tiny tokenizer splits the template's system part into the 64 tokens the stock pipeline drops
    prefix = pipe.prompt_template_encode.split("<|im_start|>user\n")[0] + "<|im_start|>user\n"
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 64

    images = [image(0, (3, 16, 24))] + ([image(1, (3, 48, 16))] if name == "plus" else [])
    condition = ConditionImages.from_tensors(images)
    cond = policy.encode_prompt(["make it red", "make it red", "add a hat to the cat"], [condition] * 3, 16, 16)
    embeds, latents, shapes = cond["prompt_embeds"], cond["image_latents"], cond["image_shapes"]
    assert embeds[0] is embeds[1] and latents[0] is latents[1]  # one row encoded once
    assert embeds[2].shape[0] > embeds[0].shape[0] and embeds[0].shape[1] == 32  # longer prompt, hidden size 32
    # 32x32 (and 32x64) pixels: 16x16 (16x32) latents of the VAE factor 2, 8x8 (8x16) packed tokens of 4 x 4 channels
    grids = ((1, 8, 8),) if name == "edit" else ((1, 8, 8), (1, 16, 8))
    assert shapes == [grids] * 3 and latents[0].shape == (sum(h * w for _, h, w in grids), 16)
    assert latents[0].dtype == torch.float32 and cond["condition"] == [condition] * 3
    assert cond["condition_size"] == (16, 16)
    # the VL encoder sees the images: other images, other prompt embeddings and latents
    other = policy.encode_prompt(["make it red"], [ConditionImages.from_tensors(
        [image(5, im.shape) for im in images])], 16, 16)
    assert other["prompt_embeds"][0].shape == embeds[0].shape
    assert not torch.equal(other["prompt_embeds"][0], embeds[0])
    assert not torch.equal(other["image_latents"][0], latents[0])


def as_stock_checkpoint(src: str, dst) -> str:
    """A copy of the tiny Qwen-Image-Edit laid out as the real checkpoints are: its processor a stock
    ``Qwen2VLProcessor`` (model_index.json, processor_config.json) with a video processor config beside it."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (dst / "model_index.json").write_text(json.dumps(index))
    config = json.loads((dst / "processor" / "processor_config.json").read_text())
    config["processor_class"] = "Qwen2VLProcessor"
    (dst / "processor" / "processor_config.json").write_text(json.dumps(config))
    video = {k: config["image_processor"][k] for k in ("image_mean", "image_std", "merge_size", "patch_size",
                                                       "temporal_patch_size")}
    video.update(video_processor_type="Qwen2VLVideoProcessor", processor_class="Qwen2VLProcessor")
    (dst / "processor" / "video_preprocessor_config.json").write_text(json.dumps(video))
    return str(dst)


def test_a_real_checkpoints_processor_loads_without_torchvision(edit_path, tmp_path):
    """The real checkpoints' processor is a stock ``Qwen2VLProcessor``, which transformers refuses to build without
    torchvision (for its video part); flowrl then loads it without the video part, and the policy encodes prompts
    with their images as from the tiny pipeline's own processor, bit for bit."""
    from diffusers import DiffusionPipeline

    stock = as_stock_checkpoint(edit_path, tmp_path / "stock")
    torchvision = importlib.util.find_spec("torchvision") is not None
    if not torchvision:
        with pytest.raises(ImportError, match="Torchvision"):  # diffusers alone
            DiffusionPipeline.from_pretrained(stock)
    policy, reference = edit_policy(stock), edit_policy(edit_path)
    expected = "Qwen2VLProcessor" if torchvision else "ImageQwen2VLProcessor"
    assert type(policy.pipeline.processor).__name__ == expected
    condition = ConditionImages.from_tensors([image(0, (3, 16, 24))])
    cond, ref = (p.encode_prompt(["make it red"], [condition], 16, 16) for p in (policy, reference))
    assert cond["prompt_embeds"][0].shape == ref["prompt_embeds"][0].shape
    if not torchvision:  # (a torchvision install gives the stock, torchvision-backed image processor)
        assert torch.equal(cond["prompt_embeds"][0], ref["prompt_embeds"][0])
    assert torch.equal(cond["image_latents"][0], ref["image_latents"][0])


def test_image_latents_are_the_stock_normalised_vae_mode(edit_path, stock_at_area):
    """The image tokens are the stock ``prepare_latents``': the VAE posterior's mode of the resized image, normalised
    by latents_mean / latents_std, packed 2x2 (read from the stock call's transformer input)."""
    policy = edit_policy(edit_path)
    condition = condition_images(2, (3, 24, 40))
    cond = policy.encode_prompt(["make it red"], [condition], 16, 16)
    pipe, seen = policy.pipeline, []

    def capture(module, args, kwargs):
        seen.append(kwargs["hidden_states"][:, 16:].clone())  # after the 4x4 generated tokens
        raise StopIteration

    handle = pipe.transformer.register_forward_pre_hook(capture, with_kwargs=True)
    with pytest.raises(StopIteration):
        pipe(image=_to_pil(condition[0]), prompt="make it red", height=16, width=16, num_inference_steps=1,
             output_type="latent")
    handle.remove()
    assert torch.equal(cond["image_latents"][0], seen[0][0])
    config = pipe.vae.config
    mean, std = (torch.tensor(v).view(1, -1, 1, 1, 1) for v in (config.latents_mean, config.latents_std))
    pixels = pipe.image_processor.preprocess(_to_pil(condition[0]), 32, 32).unsqueeze(2)  # 24x40 -> 32x32
    z = pipe.vae.encode(pixels).latent_dist.mode()
    torch.testing.assert_close(policy.adapter.pack(((z - mean) / std)[:, :, 0])[0], seen[0][0], rtol=0, atol=0)


# ---------------------------------------------------------------- sampling equals the stock pipelines
def test_ode_sampling_equals_the_stock_pipeline_with_the_condition_images(variant, stock_at_area):
    """flowrl's all-ODE sample() with condition images is the stock ``__call__`` with the same PIL images, prompt
    and negative prompt " " at true CFG 4 (norm-rescaled), sample by sample: the same sigmas (shifted by the generated
    tokens only), VL prompt, image latents and RoPE grids. The two samples' images differ in size (Plus: in number
    too), so flowrl runs them as two groups; the output is not square, so a transposed size would show."""
    name, path = variant
    module = make_module(GRPO, path, guidance_scale=CFG,
                         policy=PolicyConfig(path, finetune_type="full", condition_image_area=AREA))
    policy, h, w, n = module.policy, 16, 24, 3
    images = [[image(3, (3, 16, 24))], [image(4, (3, 16, 48))]]
    if name == "plus":
        images[0].append(image(6, (3, 40, 16)))  # two images, then one
    conditions = [ConditionImages.from_tensors(ims) for ims in images]
    prompts = ["make it red", "add a hat to the cat"]
    x = policy.prepare_latents(2, h, w, torch.Generator().manual_seed(1))
    ours = module.sampler.sample(prompts, h, w, n, CFG, torch.Generator().manual_seed(0), latents=x,
                                 conditions=conditions)
    pipe = policy.pipeline
    for i, (prompt, ims) in enumerate(zip(prompts, images)):
        pil = [_to_pil(im) for im in ims]
        stock = pipe(image=pil if name == "plus" else pil[0], prompt=prompt, negative_prompt=" ", true_cfg_scale=CFG,
                     height=h, width=w, num_inference_steps=n, latents=policy.adapter.pack(x[i:i + 1]),
                     output_type="latent").images
        assert torch.equal(ours.sigmas, pipe.scheduler.sigmas.float())
        torch.testing.assert_close(policy.adapter.pack(ours.final[i:i + 1]), stock, rtol=1e-5, atol=1e-5)
    swapped = module.sampler.sample(prompts, h, w, n, CFG, torch.Generator().manual_seed(0), latents=x,
                                    conditions=conditions[::-1])
    assert not torch.allclose(swapped.final, ours.final)  # the condition images change the samples


def test_condition_sizes_are_the_stock_choice(variant, monkeypatch):
    """Without ``condition_image_area`` the VAE sees each image at 1024 x 1024 pixels at its aspect ratio, and the
    Plus VL encoder at 384 x 384: the sizes the stock call resizes to (read from it, stopped before the VAE)."""
    name, path = variant
    policy = FlowMatchingPolicy.from_pretrained(path, lora_rank=2)
    pipe, adapter = policy.pipeline, policy.adapter
    seen_vae, seen_vl = [], []
    encode_prompt = pipe.encode_prompt

    def record_vl(*args, image=None, **kw):
        seen_vl.append([im.size for im in (image if isinstance(image, list) else [image])])
        return encode_prompt(*args, image=image, **kw)

    def stop_at_vae(image, generator):
        seen_vae.append((image.shape[-1], image.shape[-2]))
        raise StopIteration

    monkeypatch.setattr(pipe, "encode_prompt", record_vl)
    monkeypatch.setattr(pipe, "_encode_vae_image", stop_at_vae)
    for width, height in [(40, 24), (24, 40), (32, 32), (20, 64)]:
        picture = _to_pil(image(0, (3, height, width)))
        with pytest.raises(StopIteration):
            pipe(image=[picture] if name == "plus" else picture, prompt="x", height=16, width=16,
                 num_inference_steps=1, output_type="latent")
        assert adapter.vae_size(width, height) == seen_vae[-1] and max(seen_vae[-1]) >= 1024
        assert [adapter.vl_size(width, height)] == seen_vl[-1]
        if name == "plus":
            assert 384 <= max(seen_vl[-1][0]) < 1024  # its own 384 x 384 area
    assert adapter.vl_size(1000, 500) == ((544, 256) if name == "plus" else (1440, 736))


def test_samples_whose_condition_grids_differ_batch_together(variant):
    """A batch whose condition images differ in size (Plus: in number) runs in groups of equal grids: each sample's
    velocity is the one it has alone, also through the CFG batch of negative and positive prompts."""
    name, path = variant
    policy = edit_policy(path)
    sizes = [(16, 48), (48, 16), (16, 24)]  # 64x32, 32x64 and 32x32 pixels for the VAE
    conditions = [condition_images(7 + i, (3, *s)) for i, s in enumerate(sizes)]
    if name == "plus":
        conditions[2] = ConditionImages.from_tensors([image(9), image(10)])
    cond = policy.encode_prompt(["a", "make it a red cat", "c"], conditions, 16, 16)
    assert len(set(cond["image_shapes"])) == 3
    x = policy.prepare_latents(3, 16, 16, torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.9, 0.5, 0.2])
    with torch.no_grad():
        together = policy.velocity(x, sigma, cond, CFG)
        alone = torch.cat([policy.velocity(x[i:i + 1], sigma[i:i + 1], cond.select([i]), CFG) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the families' contract
class TestQwenImageEditContract(FamilyContract):
    family, guidance = "qwen_image_edit", CFG
    policy_options = {"condition_image_area": AREA}
    images_per_row = 1

    def conditions(self, prompts=None):
        prompts = self.prompts if prompts is None else prompts
        index = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        return [ConditionImages.from_tensors([image(10 * index[p] + j, (3, 16 + 8 * j, 24))
                                              for j in range(1 + index[p] % self.images_per_row)])
                for p in prompts]

    def training_prompts(self, prompt_file, directory):
        return image_prompt_file(directory, ["make it red", "add a hat"], images_per_row=self.images_per_row)


class TestQwenImageEditPlusContract(TestQwenImageEditContract):
    """Qwen-Image-Edit-2511 (``zero_cond_t``) with one image in a group and two in the other."""

    images_per_row = 2

    @pytest.fixture()
    def path(self, plus_path):
        return plus_path


# ---------------------------------------------------------------- bad input
def test_bad_input_is_refused(edit_path, plus_path, tmp_path):
    edit, plus = edit_policy(edit_path), edit_policy(plus_path)
    one, two = condition_images(0), ConditionImages.from_tensors(torch.rand(2, 3, 16, 16))
    with pytest.raises(ConfigError, match="QwenImageEditPipeline generates from condition images, and none"):
        edit.encode_prompt(["make it red"])
    with pytest.raises(ConfigError, match="2 condition images.*QwenImageEditPipeline takes 1 per sample"):
        edit.encode_prompt(["x"], [two], 16, 16)
    four = ConditionImages.from_tensors(torch.rand(4, 3, 16, 16))
    with pytest.raises(ConfigError, match="4 condition images.*takes 1 to 3 per sample"):
        plus.encode_prompt(["x"], [four], 16, 16)
    assert len(plus.encode_prompt(["x"], [two], 16, 16)) == 1
    with pytest.raises(ConfigError, match="16x200 condition image.*crop it closer to square"):
        edit.encode_prompt(["x"], [ConditionImages.from_tensors(torch.rand(3, 200, 16))], 16, 16)
    with pytest.raises(ConfigError, match="resolution 16x18.*multiples of 4"):
        edit.check_resolution(16, 18)
    with pytest.raises(ConfigError, match="max_sequence_length=256.*never truncate.*remove it"):
        edit_policy(edit_path, max_sequence_length=256)
    assert edit.encode_prompt(["x"], [one], 16, 16)["image_shapes"] == [((1, 8, 8),)]
    # a prompt file without images is refused by name before anything trains
    text_only = tmp_path / "prompts.txt"
    text_only.write_text("make it red\nadd a hat\n")
    module = make_module(GRPO, edit_path, guidance_scale=CFG,
                         policy=PolicyConfig(edit_path, condition_image_area=AREA))
    with pytest.raises(ConfigError, match="QwenImageEditPipeline generates from condition images.*prompt files"):
        fit_one_iteration(module, str(text_only))


# ---------------------------------------------------------------- export
def test_export_round_trip_into_a_stock_edit_pipeline(edit_path, tmp_path, monkeypatch):
    """A LoRA trained by `flowrl fit` (lightning_configs/qwen_image_edit/nft.yaml) on an editing prompt file and
    written by `flowrl export` loads into a fresh stock QwenImageEditPipeline with `load_lora_weights` and gives
    flowrl's velocity there (with the same condition images), not the base model's."""
    from test_export import train_and_export

    monkeypatch.chdir(tmp_path)
    prompts = image_prompt_file(tmp_path, ["make it red", "add a hat"])
    run = train_and_export(NFT_CONFIG, edit_path, prompts, tmp_path, "lora",
                           extra_overrides=[f"--model.policy.condition_image_area={AREA}"])
    policy, adapter = run.policy, run.policy.adapter
    assert run.info["pipeline_class"] == "QwenImageEditPipeline"
    assert (run.info["lora_rank"], run.info["lora_alpha"]) == (2, 6)
    assert "max_sequence_length" not in run.info["call_kwargs"]
    cond = policy.encode_prompt(["make it red", "add a hat"], [condition_images(1), condition_images(2)], 16, 16)
    x = policy.prepare_latents(2, 16, 16, torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.8, 0.35])
    pipe = QwenImageEditPipeline.from_pretrained(edit_path)
    with torch.no_grad():
        expected = policy.velocity(x, sigma, cond, guidance_scale=1.0)
        base = adapter.forward(pipe.transformer, x, sigma, cond).float()
        pipe.load_lora_weights(run.out)
        out = adapter.forward(pipe.transformer, x, sigma, cond).float()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert (out - base).abs().max() > 1e-3, "the export equals the base model: nothing trained was exported"
