"""Wan2.2 A14B two-expert text-to-video on the tiny random ``WanPipeline`` (flowrl.policy.tiny.wan22): the
high-noise ``transformer`` and the low-noise ``transformer_2`` switched at timestep 700 of 1000, 16x16 px, 5 frames
(2 latent frames), 4 steps (sigmas 1, 0.86 | 0.60, 0.009: two steps on each expert)."""

import logging
import os

import pytest
import torch
from contract import FamilyContract
from diffusers import DiffusionPipeline, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from tiny import fit_one_iteration, make_module, randomize_lora, randomize_lora_policy

from flowrl.algorithms import GRPO, NFT
from flowrl.errors import ConfigError
from flowrl.policy import FlowMatchingPolicy, PolicyConfig, adapter_for
from flowrl.policy import wan22 as wan22_adapter
from flowrl.policy.tiny import wan, wan22
from flowrl.policy.wan import WanAdapter
from flowrl.policy.wan22 import Wan22Adapter, WanExperts
from flowrl.rewards import WeightedReward

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FRAMES, LATENT_SHAPE = 5, (4, 2, 4, 4)  # 16 px, 5 frames -> 4 channels x 2 latent frames x 4 x 4
TEXT = 32  # text tokens where the test is not about the stock pipeline's 512
PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def path(tiny_pipeline_path):
    return tiny_pipeline_path("wan22")


class Brightness:
    """Mean brightness of a video; remembers the shapes it was given."""

    def __init__(self):
        self.shapes = []

    def __call__(self, images, prompts):
        self.shapes.append(tuple(images.shape))
        return images.float().mean(dim=(1, 2, 3, 4))


def make(cls, path, *, finetune_type="lora", max_sequence_length=TEXT, **kw):
    policy = PolicyConfig(path, finetune_type=finetune_type, lora_rank=4, num_frames=FRAMES,
                          max_sequence_length=max_sequence_length)
    rewards = WeightedReward({"brightness": Brightness()}, {"brightness": 1.0})
    return make_module(cls, path, **{"rewards": rewards, "policy": policy, **kw})


def policy_of(path, **kw) -> FlowMatchingPolicy:
    return FlowMatchingPolicy.from_pretrained(path, num_frames=FRAMES, max_sequence_length=TEXT, **kw)


def expert_velocity(transformer, x, sigma, embeds):
    """One stock expert called as WanPipeline.__call__ calls it (float timestep ``sigma * 1000``)."""
    return transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=embeds, return_dict=False)[0]


# ---------------------------------------------------------------- loading, routing
def test_loading_selects_the_wan22_adapter_with_both_experts_in_one_denoiser(path):
    policy = policy_of(path, lora_rank=2)
    pipe = policy.pipeline
    assert isinstance(pipe, WanPipeline) and type(policy.adapter) is Wan22Adapter
    assert isinstance(policy.transformer, WanExperts)
    assert policy.transformer.transformer is pipe.transformer and policy.transformer.transformer_2 is pipe.transformer_2
    assert set(policy.frozen) == {"vae", "text_encoder"}  # the experts are the trained denoiser, not frozen parts
    names = [n for n, _ in policy.named_trainable_parameters()]
    high = [n for n in names if n.startswith("transformer.transformer.")]
    low = [n for n in names if n.startswith("transformer.transformer_2.")]
    assert names and all("lora" in n for n in names) and len(high) == len(low) == len(names) / 2
    assert {n.split(".", 2)[2] for n in high} == {n.split(".", 2)[2] for n in low}  # the same targets on each
    x = policy.prepare_latents(2, 16, 16, torch.Generator().manual_seed(0))
    assert x.shape == (2, *LATENT_SHAPE)
    assert policy.decode(x).shape == (2, FRAMES, 3, 16, 16)
    assert type(adapter_for(wan.build(seed=0))) is WanAdapter  # a one-transformer Wan keeps the plain adapter


def test_expert_of_is_the_stock_pipelines_choice_of_expert(path):
    """``t >= boundary_ratio * num_train_timesteps`` on the timestep the transformer gets: high-noise expert (0);
    else low-noise (1). The tiny 4-step schedule switches after step 1; UniPC's integer timesteps likewise."""
    policy = policy_of(path, finetune_type="full")
    adapter = policy.adapter
    assert adapter.boundary_timestep == 700.0
    sigmas = policy.sigmas(4, 16, 16)
    assert adapter.expert_steps(sigmas) == ([0, 1], [2, 3])
    grid = torch.linspace(0.0, 1.0, 2001)
    expected = torch.where(grid.float() * 1000 >= 700.0, 0, 1)
    assert torch.equal(adapter.expert_of(grid), expected)
    assert adapter.expert_of(torch.tensor([0.7, 0.6999])).tolist() == [0, 1]

    pipe = wan22.build(seed=0)  # the hub checkpoints' UniPC scheduler: integer timesteps
    pipe.scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                             use_flow_sigmas=True, flow_shift=3.0)
    unipc = FlowMatchingPolicy(pipe, finetune_type="full", num_frames=FRAMES).adapter
    sigmas = unipc.sigmas(10, 16, 16)
    stock = torch.where(pipe.scheduler.timesteps >= 700.0, 0, 1)
    assert torch.equal(unipc.expert_of(sigmas[:-1]), stock) and 0 < int(stock.sum()) < 10


def test_the_expert_split_is_logged_once_per_schedule(path, caplog):
    policy = policy_of(path, finetune_type="full")
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            policy.sigmas(4, 16, 16)
        policy.sigmas(3, 16, 16)
    lines = [r.getMessage() for r in caplog.records if "Wan2.2 experts" in r.getMessage()]
    assert len(lines) == 2
    assert "4 steps at 16x16: steps 0-1 on the high-noise transformer, 2-3 on the low-noise transformer_2" in lines[0]


def test_a_batch_mixing_noise_levels_sends_each_sample_to_its_expert(path):
    """Per-sample routing (NFT/AWM draw a time per sample): each row is its own expert's velocity, with the
    guidance scale of that expert, whichever way the policy runs the unconditional branch."""
    policy = policy_of(path, finetune_type="full")
    pipe, adapter = policy.pipeline, policy.adapter
    sigma = torch.tensor([0.95, 0.3, 0.75, 0.05])
    x = policy.prepare_latents(4, 16, 16, torch.Generator().manual_seed(2))
    cond = policy.encode_prompt(PROMPTS * 2)
    uncond = policy.null_condition(4)
    with torch.no_grad():
        raw = policy.velocity(x, sigma, cond)
        c = [expert_velocity(pipe.transformer if s >= 0.7 else pipe.transformer_2, x[i:i + 1], sigma[i:i + 1],
                             cond["prompt_embeds"][i:i + 1]) for i, s in enumerate(sigma.tolist())]
        u = [expert_velocity(pipe.transformer if s >= 0.7 else pipe.transformer_2, x[i:i + 1], sigma[i:i + 1],
                             uncond["prompt_embeds"][i:i + 1]) for i, s in enumerate(sigma.tolist())]
        torch.testing.assert_close(raw, torch.cat(c), rtol=0, atol=1e-5)
        wrong = expert_velocity(pipe.transformer, x, sigma, cond["prompt_embeds"])  # everything on one expert
        assert (wrong[1] - raw[1]).abs().max() > 1e-2 and (wrong[3] - raw[3]).abs().max() > 1e-2
        adapter.guidance_scale_2 = 1.5
        scales = [4.0, 1.5, 4.0, 1.5]
        expected = torch.cat([u[i] + s * (c[i] - u[i]) for i, s in enumerate(scales)])
        batched = policy.velocity(x, sigma, cond, guidance_scale=4.0)
        policy.uncond_gradient = False
        separate = policy.velocity(x, sigma, cond, guidance_scale=4.0)
        kept = policy.velocity(x, sigma, cond, 4.0, uncond_velocity=policy.unconditional_velocity(x, sigma))
    for v in (batched, separate, kept):
        torch.testing.assert_close(v, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- flowrl == stock WanPipeline
@pytest.mark.parametrize("guidance_scale, guidance_scale_2", [(3.0, None), (3.0, 1.5), (1.0, None)])
def test_ode_sampling_equals_the_stock_pipeline(path, guidance_scale, guidance_scale_2):
    """Same noise, prompts, steps and guidance: flowrl's all-ODE sample is the stock ``WanPipeline.__call__``'s,
    through the switch from the high-noise to the low-noise expert after step 1, with the low-noise expert's
    ``guidance_scale_2``."""
    module = make(GRPO, path, finetune_type="full", max_sequence_length=None)  # the default: 512
    module.policy.adapter.guidance_scale_2 = guidance_scale_2
    stock = DiffusionPipeline.from_pretrained(path)
    noise = module.policy.prepare_latents(2, 16, 16, torch.Generator().manual_seed(3))
    out = module.sampler.sample(PROMPTS, 16, 16, 4, guidance_scale, torch.Generator().manual_seed(0), latents=noise)
    seen = []

    def keep_latents(pipe, i, t, kwargs):
        seen.append(kwargs["latents"])
        return kwargs

    frames = stock(prompt=PROMPTS, height=16, width=16, num_frames=FRAMES, num_inference_steps=4,
                   guidance_scale=guidance_scale, guidance_scale_2=guidance_scale_2, latents=noise.clone(),
                   output_type="pt", callback_on_step_end=keep_latents).frames
    assert module.policy.adapter.expert_steps(module.policy.sigmas(4, 16, 16)) == ([0, 1], [2, 3])
    assert out.final.shape == seen[-1].shape == (2, *LATENT_SHAPE)
    torch.testing.assert_close(out.final, seen[-1], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.images, frames.float(), rtol=0, atol=1e-5)
    if guidance_scale_2 is not None:  # the low-noise scale changed the sample: it was applied, not ignored
        module.policy.adapter.guidance_scale_2 = None
        same_scale = module.sampler.sample(PROMPTS, 16, 16, 4, guidance_scale, torch.Generator().manual_seed(0),
                                           latents=noise)
        assert (same_scale.final - out.final).abs().max() > 1e-3


# ---------------------------------------------------------------- training both experts
def test_lora_on_both_experts_and_both_move_in_one_step(path, prompt_file):
    """A GRPO update on steps 0-2 trains the high-noise expert's LoRA (steps 0, 1) and the low-noise one's (2);
    with the adapters off, both experts are the base model."""
    module = make(GRPO, path, train_batch_size=4, noise_level=0.7)
    trained = dict(module.policy.named_trainable_parameters())
    before = {n: p.detach().clone() for n, p in trained.items()}
    fit_one_iteration(module, prompt_file)
    moved = {n for n, p in trained.items() if not torch.equal(p, before[n])}
    for expert in ("transformer", "transformer_2"):
        lora_b = {n for n in trained if n.startswith(f"transformer.{expert}.") and "lora_B" in n}
        assert lora_b and lora_b <= moved, expert

    policy, base = module.policy, policy_of(path, finetune_type="full")
    x = policy.prepare_latents(2, 16, 16, torch.Generator().manual_seed(0))
    sigma, cond = torch.tensor([0.9, 0.2]), policy.encode_prompt(PROMPTS)
    with torch.no_grad():
        live = policy.velocity(x, sigma, cond)
        with policy.adapter_disabled():
            off = policy.velocity(x, sigma, cond)
        plain = base.velocity(x, sigma, base.encode_prompt(PROMPTS))
    torch.testing.assert_close(off, plain, rtol=0, atol=1e-6)
    assert all((live[i] - off[i]).abs().max() > 1e-4 for i in range(2))  # both rows (both experts) carry LoRA


def test_nft_trains_on_a_batch_mixing_both_experts(path, prompt_file):
    """NFT draws training times per sample: a micro-batch mixes both experts and its update moves both."""
    module = make(NFT, path, train_batch_size=4, num_train_timesteps=2)
    randomize_lora(module)
    trained = dict(module.policy.named_trainable_parameters())
    before = {n: p.detach().clone() for n, p in trained.items()}
    fit_one_iteration(module, prompt_file)
    for expert in ("transformer", "transformer_2"):
        assert any(not torch.equal(p, before[n]) for n, p in trained.items() if n.startswith(f"transformer.{expert}."))


class TestWan22Contract(FamilyContract):
    """Videos: 5 frames of 16 px, 32 text tokens; the rollouts' steps 0-1 are the high-noise expert's, 2-3 the
    low-noise expert's, so every contract check covers both experts."""

    family, policy_options, image_shape = "wan22", {"num_frames": FRAMES, "max_sequence_length": TEXT}, (FRAMES, 3, 16, 16)

    def rewards(self):
        self.reward = Brightness()
        return WeightedReward({"brightness": self.reward}, {"brightness": 1.0})

    def check_rewarded(self, module):
        assert self.reward.shapes and all(s == (4, FRAMES, 3, 16, 16) for s in self.reward.shapes)

    def check_checkpointing(self, path, finetune_type, off, on, calls):
        # sigma 0.8 on the high-noise expert, 0.3 on the low-noise one: each one's single block ran checkpointed
        assert calls == 2
        assert any(n.startswith("transformer.transformer_2.") for n in on)


# ---------------------------------------------------------------- several processes
def _high_noise_pass(policy):
    x = policy.prepare_latents(2, 16, 16, torch.Generator().manual_seed(0))
    return policy.velocity(x, torch.tensor([0.9, 0.8]), policy.encode_prompt(PROMPTS))


def test_under_ddp_an_unused_expert_gets_zero_gradients(path, one_process_mesh, monkeypatch):
    """DDP waits for every trained parameter's gradient: with several processes a batch all on the high-noise
    expert gives the low-noise expert's LoRA zero gradients (one process: none), and the same velocity."""
    policy = policy_of(path, lora_rank=2)
    randomize_lora_policy(policy)
    alone = _high_noise_pass(policy)
    alone.square().mean().backward()
    assert all(p.grad is None for n, p in policy.named_trainable_parameters() if ".transformer_2." in n)
    policy.zero_grad(set_to_none=True)
    monkeypatch.setattr(wan22_adapter, "_world_size", lambda: 2)
    v = _high_noise_pass(policy)
    assert torch.equal(v, alone)
    v.square().mean().backward()
    grads = {n: p.grad for n, p in policy.named_trainable_parameters()}
    assert all(g is not None and not g.any() for n, g in grads.items() if ".transformer_2." in n)
    assert any(g.any() for n, g in grads.items() if ".transformer_2." not in n)


def test_under_fsdp2_every_process_runs_the_experts_any_process_needs(path, one_process_mesh, monkeypatch):
    """FSDP2 all-gathers blocks collectively: when another process has low-noise samples, this one runs the
    low-noise expert too (on one sample whose output is dropped), so the collectives match; its velocity is
    unchanged."""
    policy = policy_of(path, lora_rank=2)
    policy.shard(one_process_mesh)
    with torch.no_grad():
        alone = _high_noise_pass(policy)
    calls = []
    policy.transformer.transformer_2.register_forward_hook(lambda m, a, k, out: calls.append(k["hidden_states"].shape),
                                                           with_kwargs=True)
    monkeypatch.setattr(wan22_adapter, "_any_process", lambda flags, device: [True, True])  # another process
    v = _high_noise_pass(policy)
    assert calls and calls[0][0] == 1  # one dummy sample
    torch.testing.assert_close(v.detach(), alone, rtol=0, atol=0)
    v.square().mean().backward()  # the dropped sample's zero gradient is reduce-scattered like the others


# ---------------------------------------------------------------- export
def test_export_round_trip_into_a_stock_two_expert_pipeline(path, prompt_file, tmp_path, monkeypatch):
    """`flowrl export` of a trained LoRA writes one file per expert; a fresh stock WanPipeline loads them with
    `load_lora_weights(out)` and `load_lora_weights(out, weight_name=..., load_into_transformer_2=True)` and gives
    flowrl's velocity for a high- and a low-noise sample. The same folder is a distillation teacher."""
    from test_export import train_and_export

    from flowrl.policy.teacher import frozen_denoiser

    monkeypatch.chdir(tmp_path)
    run = train_and_export(os.path.join(ROOT, "lightning_configs", "wan22", "grpo.yaml"), path, prompt_file,
                           tmp_path, "lora")
    policy, info = run.policy, run.info
    files = [f["weight_name"] for f in info["lora_files"]]
    assert files == ["pytorch_lora_weights.safetensors", "pytorch_lora_weights_transformer_2.safetensors"]
    assert all(os.path.isfile(os.path.join(run.out, f)) for f in files)
    assert info["lora_files"][1]["load_lora_weights_kwargs"]["load_into_transformer_2"] is True
    assert (info["lora_rank"], info["lora_alpha"]) == (2, 6) and "load_into_transformer_2=True" in info["load_with"]

    x = policy.prepare_latents(2, 16, 16, torch.Generator().manual_seed(0))
    sigma, cond = torch.tensor([0.8, 0.35]), policy.encode_prompt(PROMPTS)
    with torch.no_grad():
        expected = policy.velocity(x, sigma, cond)
    stock = WanPipeline.from_pretrained(path)

    def stock_velocity():
        with torch.no_grad():
            return policy.adapter.forward(WanExperts(stock.transformer, stock.transformer_2), x, sigma, cond)

    base = stock_velocity()
    stock.load_lora_weights(run.out)
    high_only = stock_velocity()
    torch.testing.assert_close(high_only[0], expected[0], rtol=1e-5, atol=1e-5)
    assert (high_only[1] - expected[1]).abs().max() > 1e-3  # the low-noise expert's LoRA is in the second file
    stock.load_lora_weights(run.out, **info["lora_files"][1]["load_lora_weights_kwargs"])
    out = stock_velocity()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert all((out[i] - base[i]).abs().max() > 1e-3 for i in range(2))

    teacher = frozen_denoiser(policy, run.out)
    assert isinstance(teacher, WanExperts) and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        taught = policy.velocity(x, sigma, cond, denoiser=teacher)
    torch.testing.assert_close(taught, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- bad input
def test_two_experts_without_a_boundary_are_refused():
    pipe = wan22.build(seed=0)
    pipe.register_to_config(boundary_ratio=None)
    with pytest.raises(ConfigError, match="two experts but boundary_ratio=None.*0.875"):
        FlowMatchingPolicy(pipe, num_frames=FRAMES)


def test_a_boundary_without_the_low_noise_expert_is_refused():
    pipe = wan.build(seed=0)
    pipe.register_to_config(boundary_ratio=0.875)
    with pytest.raises(ConfigError, match="boundary_ratio=0.875 but no transformer_2.*both experts"):
        FlowMatchingPolicy(pipe, num_frames=FRAMES)


def test_experts_of_two_different_models_are_refused():
    pipe = wan22.build(seed=0)
    pipe.transformer_2 = WanTransformer3DModel.from_config({**pipe.transformer.config, "rope_max_seq_len": 16})
    with pytest.raises(ConfigError, match="differ in \\['rope_max_seq_len'\\]"):
        FlowMatchingPolicy(pipe, num_frames=FRAMES)


def test_lora_targets_naming_one_expert_are_refused(path):
    with pytest.raises(ConfigError, match="name modules of one Wan2.2 expert.*attn1.to_q"):
        policy_of(path, target_modules=["transformer_2.blocks.0.attn1.to_q"])


def test_frame_counts_and_sizes_are_checked_as_for_wan(path):
    with pytest.raises(ConfigError, match="num_frames=6.*use 5 or 9"):
        FlowMatchingPolicy.from_pretrained(path, num_frames=6)
    with pytest.raises(ConfigError, match="12x16.*multiple of 8"):
        make(GRPO, path, resolution=[12, 16])


def test_a_teacher_lora_without_the_low_noise_file_is_refused(path, tmp_path):
    from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE

    from flowrl.policy.teacher import frozen_denoiser

    (tmp_path / LORA_WEIGHT_NAME_SAFE).write_bytes(b"")
    with pytest.raises(ConfigError, match="no low-noise expert file 'pytorch_lora_weights_transformer_2.safetensors'"):
        frozen_denoiser(policy_of(path, lora_rank=2), str(tmp_path))
