from types import SimpleNamespace

import lightning as L
import pytest
import torch
from tiny import make_module, randomize_lora

from callbacks import EMA, OffPolicySampling, ReferenceModel
from flowrl.algorithms import ALGORITHMS, NFT
from flowrl.data import PromptDataModule
from flowrl.losses import nft_loss
from flowrl.policy import PolicyConfig
from flowrl.rewards import RewardSpec

PROMPTS = ["a red circle"] * 2 + ["two squares"] * 2
ADV = torch.tensor([1.5, -1.5, 0.5, -0.5])


def make_nft(path, **kw):
    return make_module(NFT, path, **{"num_train_timesteps": 2, **kw})


def attach(module, *callbacks):
    """A stand-in trainer holding ``callbacks`` (what the module looks up outside ``fit``)."""
    module._trainer = SimpleNamespace(callbacks=list(callbacks), global_rank=0, world_size=1)
    return module


def test_registered_and_decoupled_flags(tiny_sd3_path):
    assert ALGORITHMS["nft"] is NFT and NFT.trainer_type == "nft"
    assert NFT.needs_log_prob is False and NFT.stores_trajectory is False
    module = make_nft(tiny_sd3_path, nft_beta=0.1)
    assert module.dynamics.name == "ODE"  # solver-agnostic; ODE by default
    assert module.hparams["nft_beta"] == 0.1 and module.hparams["time_sampling_strategy"] == "discrete_with_init"
    rollout = module.rollout(PROMPTS)
    assert rollout.latents is None and rollout.log_probs is None  # only the final latents are kept
    assert rollout.final.shape[0] == 4 and rollout.images.shape == (4, 3, 16, 16)


@pytest.mark.parametrize("dynamics_type", ["ODE", "CPS", "Flow-SDE", "Dance-SDE"])
def test_any_sampler_is_accepted(tiny_sd3_path, dynamics_type):
    noise = {} if dynamics_type == "ODE" else {"noise_level": 0.5}  # ODE refuses a noise level (it would do nothing)
    module = make_nft(tiny_sd3_path, dynamics_type=dynamics_type, **noise)
    rollout = module.rollout(PROMPTS)
    assert torch.isfinite(rollout.final).all()


def test_training_data_and_loss_equal_the_loss_function(tiny_sd3_path):
    module = make_nft(tiny_sd3_path, nft_beta=0.5, train_guidance_scale=2.0)
    randomize_lora(module)
    rollout = module.rollout(PROMPTS)
    units = module.training_units(rollout)
    forward = rollout.forward
    assert units == [0, 1]
    assert forward.times.shape == (4, 2) and forward.noise.shape == (2, *rollout.final.shape)
    # discrete_with_init: the first training time of every sample is the sampler's first (noisiest) step.
    assert torch.equal(forward.times[:, 0], rollout.sigmas[0].expand(4))
    # the draw is seeded: the same iteration gives the same times and noise
    again = module.rollout(PROMPTS)
    module.training_units(again)
    assert torch.equal(again.forward.times, forward.times) and torch.equal(again.forward.noise, forward.noise)

    for sl in module.sampler.chunks(4):
        idx = torch.arange(4)[sl]
        for k in units:
            out = module.training_loss(rollout, ADV, idx, k)
            x0, eps, t = rollout.final[idx], forward.noise[k, idx], forward.times[idx, k]
            x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
            cond = rollout.cond.select(idx)
            v = module.policy.velocity(x_t, t, cond, 2.0)
            v_old = forward.v_old[k, idx]
            # on-policy, before any update, the old velocity is the live one (bit for bit) ...
            assert torch.equal(v_old, v.detach())
            # ... so the implicit positive and negative policies coincide
            assert torch.allclose(out["positive_loss"], out["negative_loss"])
            expected = nft_loss(v, v_old, x_t, x0, t, ADV[idx], 0.5, 5.0)
            assert torch.equal(out["loss"], expected["loss"])
            assert out["loss"].requires_grad


def test_old_velocity_is_fixed_before_updates(tiny_sd3_path):
    """v_old is computed once per iteration: updating the weights afterwards does not move it."""
    module = make_nft(tiny_sd3_path)
    rollout = module.rollout(PROMPTS)
    module.training_units(rollout)
    v_old = rollout.forward.v_old.clone()
    randomize_lora(module, 0.5)
    out = module.training_loss(rollout, ADV, torch.arange(2), 0)
    assert torch.equal(rollout.forward.v_old, v_old)
    assert not torch.allclose(out["positive_loss"], out["negative_loss"])


def test_kl_to_the_reference_uses_the_base_model(tiny_sd3_path):
    module = make_nft(tiny_sd3_path)
    randomize_lora(module)
    ref = ReferenceModel(kl_beta=0.5)
    attach(module, ref)
    ref.build(module)  # fit start does this
    assert ref.uses_copy is False  # LoRA: the reference is the adapter-disabled model, no copy
    rollout = module.rollout(PROMPTS)
    module.training_units(rollout)
    idx = torch.arange(2)
    x_t, x0, _, t = module.noised(rollout, idx, 1)
    cond = rollout.cond.select(idx)
    with module.policy.adapter_disabled(), torch.no_grad():
        v_base = module.policy.velocity(x_t, t, cond, 1.0)
    assert torch.equal(rollout.forward.v_ref[1, idx], v_base)
    out = module.training_loss(rollout, ADV, idx, 1)
    v = module.policy.velocity(x_t, t, cond, 1.0)
    expected = nft_loss(v, rollout.forward.v_old[1, idx], x_t, x0, t, ADV[idx], 1.0, 5.0, v_base, 0.5)
    assert torch.equal(out["loss"], expected["loss"]) and out["kl_loss"] > 0
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.policy.trainable_parameters())


def test_x_based_kl_is_refused(tiny_sd3_path):
    module = attach(make_nft(tiny_sd3_path), ReferenceModel(kl_beta=0.1, kl_type="x-based"))
    with pytest.raises(ValueError, match="kl_type: v-based"):
        module.on_fit_start()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(nft_beta=0.0), "nft_beta"),
        (dict(adv_clip_range=0.0), "adv_clip_range"),
        (dict(time_sampling_strategy="beta"), "time_sampling_strategy"),
        (dict(num_train_timesteps=9), "lower it"),
        (dict(time_sampling_strategy="uniform", num_train_timesteps=None), "needs num_train_timesteps"),
        (dict(train_guidance_scale=0.5), "train_guidance_scale"),
    ],
)
def test_configuration_errors(tiny_sd3_path, kw, match):
    with pytest.raises(ValueError, match=match):
        make_nft(tiny_sd3_path, **kw)


class RecordingNFT(NFT):
    """Records the weights that sampled each rollout, and the rollouts."""

    def on_fit_start(self):
        super().on_fit_start()
        draw, self.sampled_with = self.sampler.sample, []

        def recording_sample(*args, **kwargs):  # the weights in the model while a training rollout samples
            if self.trainer.training:
                self.sampled_with.append({n: p.detach().clone() for n, p in self.policy.named_trainable_parameters()})
            return draw(*args, **kwargs)

        self.sampler.sample = recording_sample

    def training_units(self, rollout):
        units = super().training_units(rollout)
        self.rollouts = getattr(self, "rollouts", []) + [rollout]
        return units


def test_off_policy_rollouts_use_ema_weights_while_live_weights_train(tiny_sd3_path, prompt_file):
    module = RecordingNFT(PolicyConfig(tiny_sd3_path, lora_rank=4), rewards=[RewardSpec("jpeg_incompressibility")],
                          group_size=2, resolution=16, num_inference_steps=4, guidance_scale=3.0, train_batch_size=2,
                          num_train_timesteps=2, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    randomize_lora(module)
    initial = {n: p.detach().clone() for n, p in module.policy.named_trainable_parameters()}
    ema = EMA(ema_decay=1.0)  # decay 1: the average stays the initial weights
    dm = PromptDataModule(prompt_file, group_size=2, batch_size=4)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, use_distributed_sampler=False,
                        callbacks=[ema, OffPolicySampling()])
    trainer.fit(module, datamodule=dm)
    assert module.iteration == 2 and len(module.sampled_with) == 2  # 2 optimizer steps per iteration
    live = dict(module.policy.named_trainable_parameters())
    assert any(not torch.equal(live[n], initial[n]) for n in initial)  # the live weights trained
    for weights in module.sampled_with:  # every rollout came from the EMA (= initial) weights
        assert all(torch.equal(weights[n], initial[n]) for n in initial)
    # v_old of the last iteration is the EMA policy's velocity, not the live one's
    rollout = module.rollouts[-1]
    units = list(range(rollout.forward.num_units))
    with ema.swapped(module):
        v_ema = module._frozen_velocities(rollout, units)
    assert torch.equal(rollout.forward.v_old, v_ema)
    assert not torch.allclose(module._frozen_velocities(rollout, units), v_ema)


def test_fit_runs_nft_steps_and_logs(tiny_sd3_path, prompt_file, tmp_path):
    module = make_nft(tiny_sd3_path, dynamics_type="CPS", time_sampling_strategy="logit_normal", num_inner_epochs=2)
    before = {n: p.detach().clone() for n, p in module.policy.named_trainable_parameters()}
    dm = PromptDataModule(prompt_file, val_prompts=["a red circle", "a cat"], group_size=2, batch_size=4,
                          val_batch_size=2)
    ema = EMA(ema_decay=0.5, ema_decay_schedule="piecewise_linear", flat_steps=1, ramp_rate=0.25)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=L.pytorch.loggers.CSVLogger(tmp_path),
                        enable_checkpointing=False, enable_progress_bar=False, log_every_n_steps=1,
                        limit_val_batches=1, val_check_interval=1, use_distributed_sampler=False,
                        callbacks=[ema, OffPolicySampling()])
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 4 and module.iteration == 1 and ema.num_updates == 1
    assert any(not torch.equal(p, before[n]) for n, p in module.policy.named_trainable_parameters())
    for key in ["train/loss", "train/policy_loss", "train/positive_loss", "train/negative_loss", "train/r_mean",
                "train/grad_norm", "train/reward_mean", "val/reward"]:
        assert key in trainer.logged_metrics, key
