"""Wan2.1 text-to-video on the tiny random ``WanPipeline`` (flowrl.policy.tiny.wan): 16x16 px, 5 frames (2 latent
frames), 4 steps."""

import os

import pytest
import torch
from contract import FamilyContract
from diffusers import DiffusionPipeline, UniPCMultistepScheduler, WanPipeline
from tiny import fit_one_iteration, make_module

from flowrl.algorithms import GRPO
from flowrl.errors import ConfigError
from flowrl.policy import FlowMatchingPolicy, PolicyConfig
from flowrl.policy.tiny.wan import build
from flowrl.policy.wan import WanAdapter
from flowrl.rewards import WeightedReward

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FRAMES, LATENT_SHAPE = 5, (4, 2, 4, 4)  # 16 px, 5 frames -> 4 channels x 2 latent frames x 4 x 4
TEXT = 32  # text tokens where the test is not about the stock pipeline's 512 (the tiny UMT5 is faster on 32)
PROMPTS = ["a red circle"] * 2 + ["two blue squares"] * 2


@pytest.fixture(scope="module")
def wan_path(tiny_pipeline_path):
    return tiny_pipeline_path("wan")


class Brightness:
    """Mean brightness of a video; remembers the shapes it was given."""

    def __init__(self):
        self.shapes = []

    def __call__(self, images, prompts):
        self.shapes.append(tuple(images.shape))
        if images.ndim != 5:
            raise ValueError(f"expected videos (B, T, C, H, W), got {tuple(images.shape)}")
        return images.float().mean(dim=(1, 2, 3, 4))


def make_wan(cls, path, *, finetune_type="lora", num_frames=FRAMES, max_sequence_length=TEXT,
             frozen_dtype="float32", **kw):
    reward = Brightness()
    policy = PolicyConfig(path, finetune_type=finetune_type, lora_rank=4, num_frames=num_frames,
                          max_sequence_length=max_sequence_length, frozen_dtype=frozen_dtype)
    kw = {"rewards": WeightedReward({"brightness": reward}, {"brightness": 1.0}), "policy": policy, **kw}
    module = make_module(cls, path, **kw)
    module.test_reward = reward
    return module


# ---------------------------------------------------------------- loading, shapes
def test_loading_selects_the_wan_adapter_with_video_shapes(wan_path):
    policy = FlowMatchingPolicy.from_pretrained(wan_path, lora_rank=2, num_frames=FRAMES)
    assert isinstance(policy.pipeline, WanPipeline) and isinstance(policy.adapter, WanAdapter)
    assert set(policy.frozen) == {"vae", "text_encoder"}
    reference = build(seed=0)  # the saved weights came back
    for (n, a), (_, b) in zip(policy.pipeline.vae.state_dict().items(), reference.vae.state_dict().items()):
        assert torch.equal(a, b), n
    names = [n for n, _ in policy.named_trainable_parameters()]
    assert names and all("lora" in n for n in names)
    assert any(".attn1.to_q." in n for n in names) and any(".attn2.to_out.0." in n for n in names)
    x = policy.prepare_latents(2, 16, 16, torch.Generator().manual_seed(0))
    assert x.shape == (2, *LATENT_SHAPE)
    cond = policy.encode_prompt(["a red circle", "two blue squares"])
    assert cond["prompt_embeds"].shape[:2] == (2, 512)  # WanPipeline.__call__'s text length
    v = policy.velocity(x, torch.tensor([0.9, 0.4]), cond, guidance_scale=3.0)
    assert v.shape == x.shape and v.dtype == torch.float32
    video = policy.decode(x)
    assert video.shape == (2, FRAMES, 3, 16, 16) and video.dtype == torch.float32
    assert video.min() >= 0 and video.max() <= 1
    assert policy.adapter.encode_images(video).shape == x.shape
    # no num_frames: Wan's 81 frames (21 latent frames)
    assert FlowMatchingPolicy.from_pretrained(wan_path).adapter.latent_shape(16, 16) == (4, 21, 4, 4)


# ---------------------------------------------------------------- flowrl == stock WanPipeline
@pytest.mark.parametrize("guidance_scale, expand_timesteps", [(3.0, False), (1.0, False), (3.0, True)])
def test_ode_sampling_equals_the_stock_pipeline(wan_path, guidance_scale, expand_timesteps):
    """Same noise, prompts, steps and guidance: flowrl's all-ODE sample is the stock ``WanPipeline.__call__``'s
    (sigmas, timestep input, text length, CFG, latent layout), and its decode is the stock ``output_type="pt"``."""
    module = make_wan(GRPO, wan_path, finetune_type="full", max_sequence_length=None)  # the default: 512
    stock = DiffusionPipeline.from_pretrained(wan_path)
    for pipe in (module.policy.pipeline, stock):
        pipe.register_to_config(expand_timesteps=expand_timesteps)  # Wan2.2 TI2V's per-token timesteps
    prompts = ["a red circle", "two blue squares"]
    noise = module.policy.prepare_latents(2, 16, 16, torch.Generator().manual_seed(3))
    out = module.sampler.sample(prompts, 16, 16, 4, guidance_scale, torch.Generator().manual_seed(0), latents=noise)
    seen = {}

    def keep_latents(pipe, i, t, kwargs):
        seen["latents"] = kwargs["latents"]
        return kwargs

    frames = stock(prompt=prompts, height=16, width=16, num_frames=FRAMES, num_inference_steps=4,
                   guidance_scale=guidance_scale, latents=noise.clone(), output_type="pt",
                   callback_on_step_end=keep_latents).frames
    assert out.final.shape == seen["latents"].shape == (2, *LATENT_SHAPE)
    torch.testing.assert_close(out.final, seen["latents"], rtol=0, atol=1e-5)
    assert out.images.shape == frames.shape == (2, FRAMES, 3, 16, 16)
    torch.testing.assert_close(out.images, frames.float(), rtol=0, atol=1e-5)
    assert not torch.allclose(out.final, noise)


def test_integer_timesteps_of_the_hub_unipc_scheduler():
    """The hub checkpoints' UniPC scheduler: flowrl's sigmas are its sigmas and the transformer gets its int64
    timesteps, exactly; a sigma off the schedule (NFT/AWM re-noising) gets floor(sigma * 1000)."""
    pipe = build(seed=0)
    pipe.scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                             use_flow_sigmas=True, flow_shift=3.0)
    policy = FlowMatchingPolicy(pipe, finetune_type="full", num_frames=FRAMES)
    for steps in (4, 20):
        sigmas = policy.sigmas(steps, 16, 16)
        pipe.scheduler.set_timesteps(steps)
        assert torch.equal(sigmas, pipe.scheduler.sigmas.float()) and sigmas[-1] == 0
        t = policy.adapter.timestep(sigmas[:-1])
        assert t.dtype == torch.int64 and torch.equal(t, pipe.scheduler.timesteps)
    assert policy.adapter.timestep(torch.tensor([0.12345])).tolist() == [123]


# ---------------------------------------------------------------- RL on videos
class TestWanContract(FamilyContract):
    """Videos: 5 frames of 16 px (the tiny VAE's shortest clip), 32 text tokens, a reward that sees whole videos."""

    family, policy_options, image_shape = "wan", {"num_frames": FRAMES, "max_sequence_length": TEXT}, (FRAMES, 3, 16, 16)

    def rewards(self):
        self.reward = Brightness()
        return WeightedReward({"brightness": self.reward}, {"brightness": 1.0})

    def check_rewarded(self, module):
        assert self.reward.shapes and all(s == (4, FRAMES, 3, 16, 16) for s in self.reward.shapes)

    def check_checkpointing(self, path, finetune_type, off, on, calls):
        assert calls == 1  # the one block really ran checkpointed (CFG branches batched in one pass)

    def test_rollout_latents_are_videos(self, path):
        module = self.make(GRPO, path, clip_range=1e-2)
        assert module.rollout(PROMPTS).latents.shape == (4, 3, *LATENT_SHAPE)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_bf16_frozen_base_keeps_exact_on_policy_ratios(wan_path, prompt_file, precision):
    """The shipped configs' setting: LoRA on a bfloat16 base (and bf16 VAE / UMT5), one micro-batch."""
    module = make_wan(GRPO, wan_path, frozen_dtype="bfloat16", train_batch_size=4)
    assert {p.dtype for p in module.policy.frozen.parameters()} == {torch.bfloat16}
    metrics = fit_one_iteration(module, prompt_file, precision=precision).logged_metrics
    assert metrics["train/ratio_min"] == 1.0 and metrics["train/ratio_max"] == 1.0
    assert torch.isfinite(metrics["train/loss"])


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("num_frames, nearest", [(6, "use 5 or 9"), (32, "use 29 or 33"), (2, "use 1 or 5")])
def test_frame_count_the_vae_cannot_make_is_refused(wan_path, num_frames, nearest):
    with pytest.raises(ConfigError, match=f"num_frames={num_frames}.*1 \\+ 4 \\* k frames.*{nearest}"):
        make_wan(GRPO, wan_path, num_frames=num_frames)
    with pytest.raises(ConfigError, match="num_frames"):
        PolicyConfig(wan_path, num_frames=0)


def test_resolution_the_vae_cannot_make_is_refused(wan_path):
    with pytest.raises(ConfigError, match="12x16.*multiple of 8.*use height 8 or 16 and width 16"):
        make_wan(GRPO, wan_path, resolution=[12, 16])
    with pytest.raises(ConfigError, match="eval|multiple of 8"):
        make_wan(GRPO, wan_path, eval={"resolution": 20})
    with pytest.raises(ConfigError, match="rotary table"):
        make_wan(GRPO, wan_path, resolution=[16, 8 * 40])


def test_num_frames_on_an_image_family_is_refused(tiny_sd3_path):
    with pytest.raises(ConfigError, match="num_frames=5.*generates images.*remove num_frames"):
        FlowMatchingPolicy.from_pretrained(tiny_sd3_path, num_frames=5)
    FlowMatchingPolicy.from_pretrained(tiny_sd3_path, num_frames=None)  # unset: fine


def test_export_round_trip_into_a_stock_wan_pipeline(tiny_pipeline_path, prompt_file, tmp_path, monkeypatch):
    """A LoRA trained by `flowrl fit` and written by `flowrl export` loads into a fresh stock WanPipeline with
    `load_lora_weights` and gives flowrl's velocity there (5-frame clips)."""
    from test_export import assert_export_round_trip

    monkeypatch.chdir(tmp_path)
    assert_export_round_trip(tiny_pipeline_path("wan"), WanPipeline, tmp_path, prompt_file,
                             config=os.path.join(ROOT, "lightning_configs", "wan", "grpo.yaml"))
