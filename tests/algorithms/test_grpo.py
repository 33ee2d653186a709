import lightning as L
import pytest
import torch
from tiny import assert_on_policy_ratios_are_one, fit_one_iteration, make_module

from flowrl.algorithms import GRPO
from flowrl.data import PromptDataModule
from flowrl.policy import PolicyConfig


def make_grpo(path, **kw):
    return make_module(GRPO, path, **{"clip_range": 1e-2, **kw})


@pytest.mark.parametrize("dynamics_type", ["Flow-SDE", "Dance-SDE", "CPS"])
def test_on_policy_ratio_is_exactly_one(tiny_sd3_path, dynamics_type):
    module = make_grpo(tiny_sd3_path, dynamics_type=dynamics_type, noise_level=0.5)
    with torch.no_grad():  # a non-zero LoRA so the check is not trivially about the base weights
        for p in module.policy.trainable_parameters():
            p.normal_(0, 0.05)
    prompts = ["a red circle"] * 2 + ["two squares"] * 2
    rollout = module.rollout(prompts)
    assert rollout.log_probs.dtype == torch.float32 and rollout.log_probs.shape == (4, 3)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    assert_on_policy_ratios_are_one(module, rollout, advantages)


def test_stored_trajectory_matches_odes_outside_trained_steps(tiny_sd3_path):
    module = make_grpo(tiny_sd3_path, train_steps=[1], num_train_steps=1)
    rollout = module.rollout(["a red circle", "a red circle"])
    assert rollout.train_steps == [1] and rollout.latents.shape[1] == 1
    assert rollout.images.shape == (2, 3, 16, 16)
    # Identical noise seeds but different prompts lead to different samples.
    assert not torch.equal(rollout.next_latents[0], rollout.next_latents[1])


def test_fit_runs_grpo_steps_and_logs(tiny_sd3_path, prompt_file, tmp_path):
    module = make_grpo(tiny_sd3_path, num_inner_epochs=2, gradient_accumulation_steps=1)
    before = {n: p.detach().clone() for n, p in module.policy.named_trainable_parameters()}
    dm = PromptDataModule(prompt_file, val_prompts=["a red circle", "a cat"], group_size=2, batch_size=4, val_batch_size=2)
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, log_every_n_steps=1, limit_val_batches=1, val_check_interval=1,
                        use_distributed_sampler=False)
    trainer.fit(module, datamodule=dm)
    # 4 samples / train_batch_size 2 = 2 micro-batches per epoch, 2 epochs: 4 optimizer steps per iteration.
    assert trainer.global_step == 4 and module.iteration == 1
    changed = [n for n, p in module.policy.named_trainable_parameters() if not torch.equal(p, before[n])]
    assert changed
    metrics = trainer.logged_metrics
    for key in ["train/reward_mean", "train/reward_std", "train/ratio_mean", "train/ratio_min", "train/ratio_max",
                "train/clip_fraction", "train/approx_kl", "train/loss", "train/lr", "train/grad_norm", "val/reward"]:
        assert key in metrics, key
    assert (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").exists()


def test_checkpoint_holds_only_trained_parameters_and_resumes(tiny_sd3_path, prompt_file, tmp_path):
    module = make_grpo(tiny_sd3_path)
    dm = PromptDataModule(prompt_file, group_size=2, batch_size=4)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, use_distributed_sampler=False)
    trainer.fit(module, datamodule=dm)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)
    assert state["state_dict"] and all("lora" in k for k in state["state_dict"])
    assert state["flowrl_iteration"] == 1
    resumed = make_grpo(tiny_sd3_path)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, use_distributed_sampler=False)
    trainer.fit(resumed, datamodule=dm, ckpt_path=ckpt)
    # max_steps is checked between iterations; each iteration here makes 2 optimizer steps.
    assert resumed.iteration == 2 and trainer.global_step == 4


def test_configuration_errors_before_any_work(tiny_sd3_path):
    with pytest.raises(ValueError, match="group_size >= 2"):
        make_grpo(tiny_sd3_path, group_size=1)
    with pytest.raises(ValueError, match="decoupled trainer"):
        make_grpo(tiny_sd3_path, dynamics_type="ODE")
    with pytest.raises(ValueError, match="multiple of"):
        make_grpo(tiny_sd3_path, resolution=15)


def test_non_finite_reward_stops_before_an_update(tiny_sd3_path, prompt_file):
    from flowrl.rewards import WeightedReward

    bad = WeightedReward({"nan": lambda images, prompts: torch.full((len(prompts),), float("nan"))}, {"nan": 1.0})
    module = make_grpo(tiny_sd3_path, rewards=bad)
    before = {n: p.detach().clone() for n, p in module.policy.named_trainable_parameters()}
    dm = PromptDataModule(prompt_file, group_size=2, batch_size=4)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, use_distributed_sampler=False)
    with pytest.raises(FloatingPointError, match="non-finite"):
        trainer.fit(module, datamodule=dm)
    assert all(torch.equal(p, before[n]) for n, p in module.policy.named_trainable_parameters())


def test_bf16_mixed_keeps_float32_math_and_exact_on_policy_ratio(tiny_sd3_path, prompt_file):
    # One micro-batch per iteration: every logged ratio is from the on-policy first update.
    module = make_grpo(tiny_sd3_path, train_batch_size=4)
    seen = {}
    original = module.dynamics.step

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen["dtype"] = out.log_prob.dtype
        return out

    module.dynamics.step = spy
    trainer = fit_one_iteration(module, prompt_file, precision="bf16-mixed")
    assert seen["dtype"] == torch.float32
    assert trainer.logged_metrics["train/ratio_min"] == 1.0 and trainer.logged_metrics["train/ratio_max"] == 1.0


def test_bitsandbytes_8bit_adamw(tiny_sd3_path, prompt_file):
    import bitsandbytes as bnb

    module = make_grpo(
        tiny_sd3_path,
        policy=PolicyConfig(tiny_sd3_path, finetune_type="full"),
        optimizer=lambda params: bnb.optim.AdamW8bit(params, lr=1e-3, min_8bit_size=16),
    )
    before = {n: p.detach().clone() for n, p in module.policy.named_trainable_parameters()}
    trainer = fit_one_iteration(module, prompt_file)
    optimizer = trainer.optimizers[0]
    states = [s for s in optimizer.state.values() if "state1" in s]
    assert any(s["state1"].dtype == torch.uint8 for s in states)  # the 8-bit path really ran
    assert any(not torch.equal(p, before[n]) for n, p in module.policy.named_trainable_parameters())


@pytest.mark.parametrize("same_initial_noise", [True, False])
def test_same_initial_noise_shares_the_start_within_groups_only(tiny_sd3_path, same_initial_noise):
    module = make_grpo(tiny_sd3_path, train_steps=[0], num_train_steps=1, same_initial_noise=same_initial_noise)
    prompts = ["a red circle"] * 2 + ["two squares"] * 2
    group_ids = torch.tensor([7, 7, 3, 3])
    start = module.rollout(prompts, group_ids).latents[:, 0]  # the stored input of step 0: the initial noise
    assert torch.equal(start[0], start[1]) == same_initial_noise
    assert torch.equal(start[2], start[3]) == same_initial_noise
    assert not torch.equal(start[0], start[2])
    rollout = module.rollout(prompts, group_ids)  # the SDE step still explores within a group
    assert not torch.equal(rollout.next_latents[0, 0], rollout.next_latents[1, 0])


def test_grad_norm_is_logged_before_clipping_with_the_clip_flag(tiny_sd3_path, prompt_file):
    """train/grad_norm is the norm the update had before clipping (so an explosion shows), not after."""
    module = make_grpo(tiny_sd3_path, train_batch_size=4, max_grad_norm=1e-12)
    seen = {}
    original = module.clip_gradients

    def spy(optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        grads = [p.grad.flatten() for p in module.policy.trainable_parameters() if p.grad is not None]
        seen["before"] = float(torch.linalg.vector_norm(torch.cat(grads)))
        original(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)
        grads = [p.grad.flatten() for p in module.policy.trainable_parameters() if p.grad is not None]
        seen["after"] = float(torch.linalg.vector_norm(torch.cat(grads)))

    module.clip_gradients = spy
    metrics = fit_one_iteration(module, prompt_file).logged_metrics
    assert seen["after"] <= 1e-11 < seen["before"]
    torch.testing.assert_close(float(metrics["train/grad_norm"]), seen["before"], rtol=1e-5, atol=0)
    assert float(metrics["train/grad_clipped"]) == 1.0
    module = make_grpo(tiny_sd3_path, train_batch_size=4, max_grad_norm=1e6)
    assert float(fit_one_iteration(module, prompt_file).logged_metrics["train/grad_clipped"]) == 0.0


def test_first_update_ratio_deviation_is_logged_and_zero_on_policy(tiny_sd3_path, prompt_file):
    # two micro-batches, two inner epochs: later updates move the ratio, the first one does not
    module = make_grpo(tiny_sd3_path, num_inner_epochs=2, gradient_accumulation_steps=2,
                       optimizer=lambda p: torch.optim.SGD(p, lr=10.0))
    metrics = fit_one_iteration(module, prompt_file).logged_metrics
    assert float(metrics["train/ratio_first_update_max_abs_dev"]) == 0.0
    assert float(metrics["train/ratio_max"]) > 1.0 or float(metrics["train/ratio_min"]) < 1.0


def test_lora_base_weights_in_frozen_dtype_keep_exact_on_policy_ratios(tiny_sd3_path, prompt_file):
    """With LoRA, frozen_dtype also holds the denoiser's base weights (as the papers' code: a bf16 base, float32
    adapters); rollout and first update still agree bit for bit, in 32-true (autocast on the base) and bf16."""
    for precision in ("32-true", "bf16-mixed"):
        module = make_grpo(tiny_sd3_path, policy=PolicyConfig(tiny_sd3_path, lora_rank=4, frozen_dtype="bfloat16"),
                           train_batch_size=4)
        dtypes = {(p.requires_grad, p.dtype) for p in module.policy.transformer.parameters()}
        assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
        assert all(p.dtype == torch.bfloat16 for p in module.policy.frozen.parameters())
        metrics = fit_one_iteration(module, prompt_file, precision=precision).logged_metrics
        assert metrics["train/ratio_min"] == 1.0 and metrics["train/ratio_max"] == 1.0, precision
        assert float(metrics["train/ratio_first_update_max_abs_dev"]) == 0.0
        trained = dict(module.policy.named_trainable_parameters())
        assert trained and all(p.dtype == torch.float32 for p in trained.values())
