"""Wan image-to-video on the tiny random ``WanImageToVideoPipeline`` (flowrl.policy.tiny.wan_i2v) in both layouts:
Wan2.1 I2V (``wan21``: condition latents + mask concatenated channel-wise, CLIP image features) and Wan2.2 TI2V
(``ti2v``: the first latent frame is the image's, timestep 0 on its tokens). 16x16 px, 5 frames (2 latent frames),
4 steps; condition images of 16x24 px, resized to the video's size as the stock pipeline does."""

import os
import zlib
from types import SimpleNamespace

import pytest
import torch
from contract import FamilyContract, condition_images, image_prompt_file
from diffusers import WanImageToVideoPipeline, WanPipeline
from tiny import fit_one_iteration, make_module

from flowrl.algorithms import GRPO
from flowrl.conditions import to_pil_image
from flowrl.errors import ConfigError
from flowrl.policy import FlowMatchingPolicy, PolicyConfig
from flowrl.policy.tiny.wan_i2v import build
from flowrl.policy.wan import WanAdapter
from flowrl.policy.wan_i2v import WanI2VAdapter
from flowrl.rewards import WeightedReward

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "lightning_configs", "wan_i2v", "grpo.yaml")

FRAMES, TEXT = 5, 32  # 2 latent frames; 32 text tokens where the test is not about the stock's 512
#: one sample's latent at 16 px: Wan2.1 I2V generates both latent frames, TI2V the second only
LATENT_SHAPE = {"wan21": (4, 2, 4, 4), "ti2v": (4, 1, 4, 4)}
VARIANTS = ("wan21", "ti2v")
PROMPTS = ["a red circle"] * 2 + ["two blue squares"] * 2


def conditions_of(prompts):
    """One condition image per prompt, the same for the same prompt (a group shares its row's image)."""
    return [condition_images(zlib.crc32(p.encode()) % 10_000) for p in prompts]


@pytest.fixture(scope="session")
def variant_paths(tiny_pipeline_path, tmp_path_factory):
    """Both tiny pipelines, saved once: ``wan21`` is the family's default tiny model (``wan_i2v``)."""
    ti2v = tmp_path_factory.mktemp("tiny-wan-ti2v")
    build(variant="ti2v").save_pretrained(ti2v)
    return {"wan21": tiny_pipeline_path("wan_i2v"), "ti2v": str(ti2v)}


@pytest.fixture()
def stock_prompt_cleaning(monkeypatch):
    """The stock ``WanImageToVideoPipeline`` cleans prompts with ftfy without checking that it is installed
    (``WanPipeline`` checks). Where it is not, an identity stand-in: ``ftfy.fix_text`` leaves plain ASCII prompts
    such as these unchanged, so the stock call computes what it computes with ftfy."""
    import diffusers.pipelines.wan.pipeline_wan_i2v as module

    try:
        import ftfy  # noqa: F401
    except ImportError:
        monkeypatch.setattr(module, "ftfy", SimpleNamespace(fix_text=lambda text: text), raising=False)


class Brightness:
    """Mean brightness of a video; remembers the shapes it was given."""

    def __init__(self):
        self.shapes = []

    def __call__(self, images, prompts):
        self.shapes.append(tuple(images.shape))
        return images.float().mean(dim=(1, 2, 3, 4))


def make_i2v(cls, path, *, finetune_type="lora", frozen_dtype="float32", **kw):
    policy = PolicyConfig(path, finetune_type=finetune_type, lora_rank=4, num_frames=FRAMES,
                          max_sequence_length=TEXT, frozen_dtype=frozen_dtype)
    kw = {"rewards": WeightedReward({"brightness": Brightness()}, {"brightness": 1.0}), "policy": policy, **kw}
    return make_module(cls, path, **kw)


# ---------------------------------------------------------------- loading and conditioning
@pytest.mark.parametrize("variant", VARIANTS)
def test_loading_selects_the_image_to_video_adapter_with_video_shapes(variant_paths, variant):
    policy = FlowMatchingPolicy.from_pretrained(variant_paths[variant], lora_rank=2, num_frames=FRAMES)
    adapter = policy.adapter
    assert isinstance(policy.pipeline, WanImageToVideoPipeline) and isinstance(adapter, WanI2VAdapter)
    assert adapter.first_frame_given == (variant == "ti2v") and adapter.condition_images == (1, 1)
    assert set(policy.frozen) == ({"vae", "text_encoder", "image_encoder"} if variant == "wan21"
                                  else {"vae", "text_encoder"})
    x = policy.prepare_latents(2, 16, 16, torch.Generator().manual_seed(0))
    assert x.shape == (2, *LATENT_SHAPE[variant])
    cond = policy.encode_prompt(PROMPTS[1:3], conditions_of(PROMPTS[1:3]), 16, 16)
    assert cond["prompt_embeds"].shape[:2] == (2, 512)  # WanImageToVideoPipeline.__call__'s text length
    if variant == "wan21":  # 4 mask channels + 4 latent channels, every latent frame; 17 CLIP tokens of width 16
        assert cond["image_condition"].shape == (2, 8, 2, 4, 4) and cond["image_embeds"].shape == (2, 17, 16)
        assert "first_latent" not in cond
    else:
        assert cond["first_latent"].shape == (2, 4, 1, 4, 4) and "image_condition" not in cond
    v = policy.velocity(x, torch.tensor([0.9, 0.4]), cond, guidance_scale=3.0)
    assert v.shape == x.shape and v.dtype == torch.float32
    video = policy.decode(x, cond)
    assert video.shape == (2, FRAMES, 3, 16, 16) and video.min() >= 0 and video.max() <= 1
    assert policy.adapter.encode_images(video).shape == x.shape
    if variant == "ti2v":
        with pytest.raises(ValueError, match="leave out the given first frame.*policy.decode\\(latents, cond\\)"):
            policy.decode(x)


@pytest.mark.parametrize("variant", VARIANTS)
def test_condition_tensors_are_the_stock_pipelines(variant_paths, variant):
    """The image's resize, VAE encoding (posterior mode), normalisation, mask and CLIP features are bit for bit what
    ``WanImageToVideoPipeline.prepare_latents`` / ``encode_image`` make; the CFG branch keeps them, only the text
    changes."""
    policy = FlowMatchingPolicy.from_pretrained(variant_paths[variant], finetune_type="full", num_frames=FRAMES,
                                                max_sequence_length=TEXT)
    pipe, image = policy.pipeline, conditions_of(["a red circle"])[0]
    cond = policy.encode_prompt(["a red circle"], [image], 16, 16)
    pixels = pipe.video_processor.preprocess(to_pil_image(image[0]), height=16, width=16)
    stock = pipe.prepare_latents(pixels, 1, 4, 16, 16, FRAMES, torch.float32, torch.device("cpu"))
    if variant == "wan21":
        assert torch.equal(cond["image_condition"], stock[1])
        assert torch.equal(cond["image_embeds"], pipe.encode_image(to_pil_image(image[0]), torch.device("cpu")))
        assert cond["image_condition"][:, :4, 0].eq(1).all() and cond["image_condition"][:, :4, 1:].eq(0).all()
    else:
        assert torch.equal(cond["first_latent"], stock[1])
        assert stock[2][0, 0, 0].eq(0).all() and stock[2][0, 0, 1:].eq(1).all()  # the stock first-frame mask
    null = policy.null_condition(1, cond)
    for key in set(cond.tensors) - {"prompt_embeds"}:
        assert torch.equal(null[key], cond[key]), key
    assert not torch.equal(null["prompt_embeds"], cond["prompt_embeds"])


def test_the_hub_ti2v_folder_loads_as_image_to_video_with_pipeline_class(variant_paths, tmp_path):
    """Wan-AI/Wan2.2-TI2V-5B-Diffusers names WanPipeline (text-to-video) in its model_index.json; diffusers 0.42 runs
    its image-to-video in WanImageToVideoPipeline: ``policy.pipeline_class`` loads it so."""
    tiny = build(variant="ti2v")
    WanPipeline(tokenizer=tiny.tokenizer, text_encoder=tiny.text_encoder, vae=tiny.vae, scheduler=tiny.scheduler,
                transformer=tiny.transformer, expand_timesteps=True).save_pretrained(tmp_path)
    as_saved = FlowMatchingPolicy.from_pretrained(str(tmp_path), num_frames=FRAMES)
    assert type(as_saved.pipeline) is WanPipeline and type(as_saved.adapter) is WanAdapter
    policy = FlowMatchingPolicy.from_pretrained(str(tmp_path), num_frames=FRAMES,
                                                pipeline_class="WanImageToVideoPipeline")
    assert type(policy.pipeline) is WanImageToVideoPipeline and policy.adapter.first_frame_given
    assert policy.adapter.latent_shape(16, 16) == LATENT_SHAPE["ti2v"]
    for bad in ("WanImageToVideo", "AutoencoderKLWan", "os.system"):
        with pytest.raises(ConfigError, match=f"pipeline_class='{bad}' is not a diffusers pipeline class"):
            PolicyConfig(str(tmp_path), pipeline_class=bad)


# ---------------------------------------------------------------- flowrl == stock WanImageToVideoPipeline
@pytest.mark.parametrize("guidance_scale", [3.0, 1.0])
@pytest.mark.parametrize("variant", VARIANTS)
def test_ode_sampling_equals_the_stock_pipeline(variant_paths, variant, guidance_scale, stock_prompt_cleaning):
    """Same noise, prompts, images, steps and guidance: flowrl's all-ODE sample is the stock ``__call__``'s (image
    preprocessing, condition layout, timesteps, CFG with the image in both branches), decoded as its
    ``output_type="pt"``. TI2V: the stock call gets a first-frame noise of its own, which it overwrites with the
    image's latents; flowrl has none."""
    path = variant_paths[variant]
    module = make_i2v(GRPO, path, finetune_type="full", policy=PolicyConfig(path, finetune_type="full",
                                                                            num_frames=FRAMES))
    stock = WanImageToVideoPipeline.from_pretrained(path, **({"image_encoder": None, "image_processor": None}
                                                             if variant == "ti2v" else {}))
    prompts = ["a red circle", "two blue squares"]
    conditions = conditions_of(prompts)
    noise = module.policy.prepare_latents(2, 16, 16, torch.Generator().manual_seed(3))
    out = module.sampler.sample(prompts, 16, 16, 4, guidance_scale, torch.Generator().manual_seed(0), latents=noise,
                                conditions=conditions)
    seen = {}

    def keep_latents(pipe, i, t, kwargs):
        seen["latents"] = kwargs["latents"]
        return kwargs

    for j, prompt in enumerate(prompts):  # the stock call takes one image for its whole batch
        start = noise[j:j + 1].clone()
        if variant == "ti2v":
            start = torch.cat([torch.randn(1, 4, 1, 4, 4, generator=torch.Generator().manual_seed(j)), start], dim=2)
        frames = stock(image=to_pil_image(conditions[j][0]), prompt=prompt, height=16, width=16, num_frames=FRAMES,
                       num_inference_steps=4, guidance_scale=guidance_scale, latents=start, output_type="pt",
                       callback_on_step_end=keep_latents).frames
        generated = seen["latents"][:, :, 1:] if variant == "ti2v" else seen["latents"]
        torch.testing.assert_close(out.final[j:j + 1], generated, rtol=0, atol=1e-5)
        assert frames.shape == (1, FRAMES, 3, 16, 16)
        torch.testing.assert_close(out.images[j:j + 1], frames.float(), rtol=0, atol=1e-5)
    assert out.final.shape == (2, *LATENT_SHAPE[variant]) and not torch.allclose(out.final, noise)


# ---------------------------------------------------------------- TI2V: the given frame is conditioning
def test_ti2v_first_frame_is_given_never_noised_nor_scored(variant_paths):
    """GRPO rollouts with Flow-SDE: every transformer call (both CFG branches, every step) sees the condition latents
    as its first frame with timestep 0 on their tokens; the stored trajectory, its noise and log-probs have the
    generated frames only; each decoded video starts with the decoded condition frame, whatever the noise."""
    module = make_i2v(GRPO, variant_paths["ti2v"], clip_range=1e-2, noise_level=0.7, train_batch_size=4)
    calls = []
    hook = module.policy.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append((kwargs["hidden_states"].detach().clone(), kwargs["timestep"])),
        with_kwargs=True)
    try:
        rollout = module.rollout(PROMPTS, conditions=conditions_of(PROMPTS))
    finally:
        hook.remove()
    given = rollout.cond["first_latent"]
    assert given.shape == (4, 4, 1, 4, 4) and torch.equal(given[0], given[1]) and not torch.equal(given[0], given[2])
    assert rollout.latents.shape == rollout.next_latents.shape == (4, 3, *LATENT_SHAPE["ti2v"])
    assert rollout.final.shape == (4, *LATENT_SHAPE["ti2v"]) and rollout.log_probs.shape == (4, 3)
    assert len(calls) == 4  # 4 steps of one batch of 4, the CFG branches in one pass
    for hidden, timestep in calls:
        assert hidden.shape == (8, 4, 2, 4, 4) and timestep.shape == (8, 2 * 2 * 2)  # 2 frames of 2x2 tokens
        assert torch.equal(hidden[:, :, :1], torch.cat([given, given]))  # unconditional branch: the same images
        assert timestep[:, :4].eq(0).all() and timestep[:, 4:].gt(0).all()
    start = module.policy.adapter.decode_conditioned(torch.zeros(4, 4, 1, 4, 4), rollout.cond)[:, 0]
    torch.testing.assert_close(rollout.images[:, 0], start, rtol=0, atol=1e-6)  # the causal VAE: frame 0 alone
    assert not torch.allclose(rollout.images[0, 1:], rollout.images[1, 1:])  # same image, different noise


# ---------------------------------------------------------------- RL on image-to-video
class I2VContract(FamilyContract):
    """Both layouts keep the family contract: rollouts from condition images, JSONL prompt files naming them."""

    policy_options, image_shape = {"num_frames": FRAMES, "max_sequence_length": TEXT}, (FRAMES, 3, 16, 16)

    def conditions(self, prompts=None):
        return conditions_of(self.prompts if prompts is None else prompts)

    def training_prompts(self, prompt_file, directory):
        prompts = [p for p in open(prompt_file, encoding="utf-8").read().splitlines() if p.strip()]
        return image_prompt_file(directory, prompts)

    def rewards(self):
        self.reward = Brightness()
        return WeightedReward({"brightness": self.reward}, {"brightness": 1.0})

    def check_rewarded(self, module):
        assert self.reward.shapes and all(s == (4, FRAMES, 3, 16, 16) for s in self.reward.shapes)

    def check_checkpointing(self, path, finetune_type, off, on, calls):
        assert calls == 1  # the one block really ran checkpointed (CFG branches batched in one pass)


class TestWan21I2VContract(I2VContract):
    family = "wan_i2v"


class TestWan22TI2VContract(I2VContract):
    family = "wan_i2v"

    @pytest.fixture()
    def path(self, variant_paths):
        return variant_paths["ti2v"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_frozen_base_keeps_exact_on_policy_ratios(variant_paths, prompt_file, tmp_path, variant):
    """The shipped configs' setting: LoRA on a bfloat16 base (and bf16 VAE / UMT5 / CLIP), bf16 autocast."""
    module = make_i2v(GRPO, variant_paths[variant], frozen_dtype="bfloat16", train_batch_size=4)
    assert {p.dtype for p in module.policy.frozen.parameters()} == {torch.bfloat16}
    rows = image_prompt_file(tmp_path, open(prompt_file).read().split("\n")[:2])
    metrics = fit_one_iteration(module, rows, precision="bf16-mixed").logged_metrics
    assert metrics["train/ratio_min"] == 1.0 and metrics["train/ratio_max"] == 1.0
    assert torch.isfinite(metrics["train/loss"])


# ---------------------------------------------------------------- bad input
def test_a_prompt_file_without_images_is_refused_by_name(variant_paths, prompt_file):
    module = make_i2v(GRPO, variant_paths["wan21"])
    with pytest.raises(ConfigError, match="WanImageToVideoPipeline generates from condition images, and none were "
                                          "given; give prompt files whose rows name them"):
        fit_one_iteration(module, prompt_file)


def test_two_images_per_sample_are_refused(variant_paths, tmp_path):
    module = make_i2v(GRPO, variant_paths["ti2v"])
    rows = image_prompt_file(tmp_path, ["a red circle", "two blue squares"], images_per_row=2)
    with pytest.raises(ConfigError, match="a sample has 2 condition images.*takes 1 per sample"):
        fit_one_iteration(module, rows)


@pytest.mark.parametrize("variant", VARIANTS)
def test_resolution_the_stock_pipeline_cannot_make_is_refused(variant_paths, variant):
    path = variant_paths[variant]
    with pytest.raises(ConfigError, match="24x16: WanImageToVideoPipeline needs .*multiples of 16; use e.g. \\[16, 16"):
        make_i2v(GRPO, path, resolution=[24, 16])  # a multiple of the tiny VAE x patch (8), not of 16
    with pytest.raises(ConfigError, match="12x16.*multiple of 8"):
        make_i2v(GRPO, path, resolution=[12, 16])


def test_frame_counts_are_checked_per_layout(variant_paths):
    with pytest.raises(ConfigError, match="num_frames=6.*1 \\+ 4 \\* k frames.*use 5 or 9"):
        FlowMatchingPolicy.from_pretrained(variant_paths["wan21"], num_frames=6)
    with pytest.raises(ConfigError, match="num_frames=1: Wan2.2 TI2V takes the first latent frame from the image.*"
                                          "use 5 or more"):
        FlowMatchingPolicy.from_pretrained(variant_paths["ti2v"], num_frames=1)
    one = FlowMatchingPolicy.from_pretrained(variant_paths["wan21"], num_frames=1)  # Wan2.1: an image from an image
    assert one.adapter.latent_shape(16, 16) == (4, 1, 4, 4)


def test_options_it_cannot_honour_are_refused(variant_paths):
    with pytest.raises(ConfigError, match="condition_image_area=262144: Wan image-to-video resizes the image to the "
                                          "video's size"):
        FlowMatchingPolicy.from_pretrained(variant_paths["wan21"], condition_image_area=262144)
    pipe = build(variant="wan21")
    two_experts = WanImageToVideoPipeline(
        tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, scheduler=pipe.scheduler,
        image_processor=pipe.image_processor, image_encoder=pipe.image_encoder, transformer=pipe.transformer,
        transformer_2=build(variant="wan21", seed=1).transformer, boundary_ratio=0.9)
    with pytest.raises(ConfigError, match="two experts.*Wan2.2 I2V-A14B.*use Wan-AI/Wan2.1-I2V-14B-480P-Diffusers.*"
                                          "Wan-AI/Wan2.2-TI2V-5B-Diffusers"):
        FlowMatchingPolicy(two_experts)


# ---------------------------------------------------------------- export
@pytest.mark.parametrize("variant", VARIANTS)
def test_export_round_trip_into_a_stock_image_to_video_pipeline(variant_paths, prompt_file, tmp_path, monkeypatch,
                                                                variant):
    """A LoRA trained by `flowrl fit` (the shipped config, a JSONL of prompts with images) and written by `flowrl
    export` loads into a fresh stock WanImageToVideoPipeline with `load_lora_weights` and gives flowrl's velocity
    there with the same conditioning, not the base model's."""
    from test_export import null_components, train_and_export

    monkeypatch.chdir(tmp_path)
    base = variant_paths[variant]
    run = train_and_export(CONFIG, base, prompt_file, tmp_path, "lora")
    policy = run.policy
    assert run.info["pipeline_class"] == "WanImageToVideoPipeline" and run.info["base_model"] == base
    prompts = ["a red circle", "two blue squares"]
    cond = policy.encode_prompt(prompts, conditions_of(prompts), 16, 16)
    latents = policy.prepare_latents(2, 16, 16, torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.8, 0.35])
    with torch.no_grad():
        expected = policy.velocity(latents, sigma, cond, guidance_scale=1.0)
        pipe = WanImageToVideoPipeline.from_pretrained(base, **null_components(base))
        before = policy.adapter.forward(pipe.transformer, latents, sigma, cond).float()
        pipe.load_lora_weights(run.out)
        after = policy.adapter.forward(pipe.transformer, latents, sigma, cond).float()
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)
    assert (after - before).abs().max() > 1e-3, "the export equals the base model: nothing trained was exported"
