"""Diffusion-DPO: the pure loss and pairing rule against hand-computed values, the online module (pairs from
rollouts, the reference, one optimizer step on every model family) and the offline module (pairs from the shipped
toy preference set)."""

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from tiny import make_module, randomize_lora

from callbacks import ReferenceModel
from flowrl.algorithms.dpo import _VAE_SALT, DiffusionDPO, OfflineDPO, PairedForwardProcess
from flowrl.errors import ConfigError
from flowrl.losses.dpo import denoising_error, dpo_loss, dpo_pairs
from flowrl.policy import PolicyConfig
from flowrl.preference_data import PreferenceDataModule
from flowrl.rewards import RewardSpec
from flowrl.toy import TOY_DIR

PROMPTS = ["a red circle"] * 2 + ["two squares"] * 2


# ---------------------------------------------------------------------------------------------- the pure functions
def test_denoising_error_by_hand():
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # (1 + 4) / 2 = 2.5 ; (4 + 9) / 2 = 6.5
    assert torch.equal(denoising_error(v, target), torch.tensor([2.5, 6.5]))
    # over every non-batch dimension
    assert denoising_error(torch.ones(3, 2, 2, 2), torch.zeros(3, 2, 2, 2)).shape == (3,)


def test_dpo_loss_by_hand():
    beta = 2.0
    w = torch.tensor([1.0, 0.5], requires_grad=True)
    lo = torch.tensor([2.0, 0.5], requires_grad=True)
    ref_w = torch.tensor([1.5, 0.5], requires_grad=True)
    ref_l = torch.tensor([1.5, 1.0])
    out = dpo_loss(w, lo, ref_w, ref_l, beta)
    # pair 1: policy diff 1 - 2 = -1, reference diff 1.5 - 1.5 = 0, logits = -2/2 * (-1 - 0) = 1
    # pair 2: policy diff 0.5 - 0.5 = 0, reference diff 0.5 - 1 = -0.5, logits = -1 * (0 + 0.5) = -0.5
    # loss = mean(log(1 + e^-1), log(1 + e^0.5)) = mean(0.3132616875, 0.9740769842)
    assert out["loss"].item() == pytest.approx(0.6436693358491648, abs=1e-6)
    assert out["loss"].item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.exp(0.5))) / 2, abs=1e-6)
    assert out["implicit_accuracy"].item() == 0.5  # logits 1 > 0, -0.5 < 0
    assert out["reward_margin"].item() == pytest.approx(0.25)  # (1 - 0.5) / 2
    # implicit rewards -beta/2 * (err - ref_err): chosen [0.5, 0], rejected [-0.5, 0.5]
    assert out["implicit_reward_chosen"].item() == pytest.approx(0.25)
    assert out["implicit_reward_rejected"].item() == pytest.approx(0.0)
    assert out["policy_chosen_error"].item() == pytest.approx(0.75)
    assert out["ref_rejected_error"].item() == pytest.approx(1.25)
    out["loss"].backward()
    # d loss / d err_w_i = (1 / P) * (beta / 2) * (1 - sigmoid(logit_i)); d / d err_l_i is its negative
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = torch.tensor([0.5 * (1 - sig(1.0)), 0.5 * (1 - sig(-0.5))])  # 0.1344707107, 0.3112296867
    torch.testing.assert_close(w.grad, expected)
    torch.testing.assert_close(lo.grad, -expected)
    assert ref_w.grad is None  # the reference side is detached
    for key, value in out.items():
        if key != "loss":
            assert not value.requires_grad, key


def test_dpo_loss_equal_errors_is_log_two_and_larger_beta_sharpens():
    e = torch.tensor([0.3, 0.7])
    out = dpo_loss(e, e.flip(0), e, e.flip(0), 5000.0)  # the policy is the reference: logits 0
    assert out["loss"].item() == pytest.approx(math.log(2.0))
    assert out["implicit_accuracy"].item() == 0.0 and out["reward_margin"].item() == 0.0
    better = (torch.tensor([0.29]), torch.tensor([0.30]), torch.tensor([0.30]), torch.tensor([0.30]))
    # logits = -beta/2 * (-0.01): 0.5 at beta 100 -> log(1 + e^-0.5) = 0.4740769842; 5 at beta 1000
    assert dpo_loss(*better, 100.0)["loss"].item() == pytest.approx(0.4740769841801067, abs=1e-5)
    assert dpo_loss(*better, 1000.0)["loss"].item() == pytest.approx(math.log1p(math.exp(-5.0)), abs=1e-5)


def test_dpo_loss_bf16_inputs_are_computed_in_float32():
    values = [torch.tensor([1.0, 0.5]), torch.tensor([2.0, 0.5]), torch.tensor([1.5, 0.5]), torch.tensor([1.5, 1.0])]
    out16 = dpo_loss(*(v.to(torch.bfloat16) for v in values), 2.0)
    out32 = dpo_loss(*values, 2.0)  # these values are exact in bf16
    assert out16["loss"].dtype == torch.float32
    assert out16["loss"].item() == out32["loss"].item()
    # a bf16 error difference below bf16's resolution at 1.0 (2^-8) still counts once cast: the float32 math sees
    # the bf16-rounded inputs exactly
    w = torch.tensor([1.0078125], dtype=torch.bfloat16)  # 1 + 2^-7, exact in bf16
    one = torch.tensor([1.0], dtype=torch.bfloat16)
    out = dpo_loss(one, w, one, one, 200.0)  # logits = -100 * (1 - 1.0078125) = 0.78125
    assert out["reward_margin"].item() == pytest.approx(0.78125)
    assert denoising_error(torch.ones(1, 4, dtype=torch.bfloat16), torch.zeros(1, 4)).dtype == torch.float32


def test_dpo_loss_refuses_bad_beta_and_shapes():
    e = torch.ones(2)
    with pytest.raises(ValueError, match="dpo_beta"):
        dpo_loss(e, e, e, e, 0.0)
    with pytest.raises(ValueError, match="one shape"):
        dpo_loss(e, torch.ones(3), e, e, 1.0)


def test_pairs_highest_and_lowest_advantage_of_each_group():
    adv = torch.tensor([0.1, 0.9, -0.5, 0.9,   # group 7: max 0.9 first at 1, min at 2
                        1.0, 1.0, 1.0,         # group 3: all equal -> no pair
                        2.0, -2.0,             # group 5: a group of two
                        0.0, 3.0, -1.0])       # group 9: sample 10 is not kept
    groups = torch.tensor([7, 7, 7, 7, 3, 3, 3, 5, 5, 9, 9, 9])
    keep = torch.ones(12, dtype=torch.bool)
    keep[10] = False
    pairs = dpo_pairs(adv, groups, keep)
    assert pairs.tolist() == [[1, 2], [7, 8], [9, 11]]  # groups in order of first appearance
    assert pairs.dtype == torch.long
    # without keep, group 9's best is sample 10
    assert dpo_pairs(adv, groups).tolist() == [[1, 2], [7, 8], [10, 11]]


def test_pairs_edge_cases():
    assert dpo_pairs(torch.tensor([0.5, 0.5]), torch.tensor([0, 0])).shape == (0, 2)  # equal rewards: none
    assert dpo_pairs(torch.tensor([-1.0, 1.0]), torch.tensor([0, 0])).tolist() == [[1, 0]]  # group of two
    assert dpo_pairs(torch.tensor([1.0, 2.0]), torch.tensor([0, 1])).shape == (0, 2)  # groups of one
    keep = torch.tensor([True, False])
    assert dpo_pairs(torch.tensor([1.0, 2.0]), torch.tensor([0, 0]), keep).shape == (0, 2)  # one kept member
    # interleaved groups (as after gathering): still per group
    assert dpo_pairs(torch.tensor([1.0, 5.0, 2.0, 4.0]), torch.tensor([0, 1, 0, 1])).tolist() == [[2, 0], [1, 3]]
    with pytest.raises(ValueError, match="differ in length"):
        dpo_pairs(torch.ones(3), torch.zeros(2))


# ---------------------------------------------------------------------------------------------- online module
def make_dpo(path, **kw):
    return make_module(DiffusionDPO, path, **{"num_train_timesteps": 2, "dpo_beta": 100.0, **kw})


def prepared(module, pairs=((0, 1), (3, 2))):
    """A rollout of PROMPTS with ``pairs`` set and the iteration's training data drawn."""
    module.build_reference()
    rollout = module.rollout(PROMPTS)
    module.set_pairs(torch.tensor(pairs))
    units = module.training_units(rollout)
    return rollout, units


def arm_errors(module, rollout, chosen, rejected, k):
    """The two arms' errors computed here from the formulas: both at the chosen sample's t and eps, the arms in one
    forward pass [chosen..., rejected...] (the module's layout, so the floating-point results agree)."""
    f = rollout.forward
    t, eps = f.times[chosen, k], f.noise[k, chosen]
    x0 = torch.cat([rollout.final[chosen], rollout.final[rejected]])
    tt, ee = torch.cat([t, t]).view(-1, 1, 1, 1), torch.cat([eps, eps])
    x_t = (1 - tt) * x0 + tt * ee
    v = module.policy.velocity(x_t, tt.view(-1), rollout.cond.select(torch.cat([chosen, rejected])),
                               module.train_guidance_scale)
    err = ((v - (ee - x0)) ** 2).mean(dim=(1, 2, 3))
    return err[: len(chosen)], err[len(chosen):]


def test_options_and_flags(tiny_sd3_path):
    assert DiffusionDPO.trainer_type == "dpo" and OfflineDPO.trainer_type == "dpo-offline"
    assert DiffusionDPO.needs_log_prob is False and DiffusionDPO.stores_trajectory is False
    module = make_dpo(tiny_sd3_path, dpo_beta=500.0)
    assert module.dynamics.name == "ODE" and module.dpo_beta == 500.0 and module.hparams["dpo_beta"] == 500.0
    assert module.hparams["ref_param_device"] == "cpu"


@pytest.mark.parametrize("kw, match", [
    (dict(dpo_beta=0.0), r"dpo_beta=0.0 is out of range: it must be > 0"),
    (dict(dpo_beta=-5.0), r"dpo_beta=-5.0 is out of range"),
    (dict(ref_param_device="nowhere"), "ref_param_device"),
    (dict(time_sampling_strategy="beta"), "time_sampling_strategy"),
])
def test_configuration_errors(tiny_sd3_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        make_dpo(tiny_sd3_path, **kw)


def test_training_data_reference_and_loss_equal_the_formulas(tiny_sd3_path):
    module = make_dpo(tiny_sd3_path, train_batch_size=4)  # the reference pass then batches both pairs, as training
    rollout, units = prepared(module)
    f = rollout.forward
    assert isinstance(f, PairedForwardProcess) and units == [0, 1]
    assert f.pairs.tolist() == [[0, 1], [3, 2]] and f.ref_errors.shape == (2, 2, 2)
    # fresh LoRA (B = 0): the policy is the reference, so every logit is 0 and the loss log 2
    out = module.training_loss(rollout, torch.zeros(4), torch.arange(4), 0)
    assert out["reward_margin"].item() == 0.0 and out["implicit_accuracy"].item() == 0.0
    assert out["loss"].item() == pytest.approx(math.log(2.0), abs=1e-7)
    randomize_lora(module)  # now the policy differs from the reference (the adapter-disabled base model)
    chosen, rejected = f.pairs[:, 0], f.pairs[:, 1]
    for k in units:
        with module.policy.adapter_disabled(), torch.no_grad():
            ref_w, ref_l = arm_errors(module, rollout, chosen, rejected, k)
        torch.testing.assert_close(f.ref_errors[k], torch.stack([ref_w, ref_l], dim=1))
        w, lo = arm_errors(module, rollout, chosen, rejected, k)
        out = module.training_loss(rollout, torch.zeros(4), torch.arange(4), k)
        expected = dpo_loss(w, lo, f.ref_errors[k, :, 0], f.ref_errors[k, :, 1], 100.0)
        torch.testing.assert_close(out["loss"], expected["loss"])
        assert out["loss"].requires_grad and out["implicit_accuracy"] in (0.0, 0.5, 1.0)
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.policy.trainable_parameters())


def test_micro_batch_trains_the_pairs_whose_chosen_sample_it_holds(tiny_sd3_path):
    module = make_dpo(tiny_sd3_path)
    rollout, _ = prepared(module, pairs=((1, 0),))  # one pair; its chosen sample is 1
    randomize_lora(module)
    held = module.training_loss(rollout, torch.zeros(4), torch.tensor([0, 1]), 0)
    assert held["loss"].item() > 0 and "implicit_accuracy" in held
    empty = module.training_loss(rollout, torch.zeros(4), torch.tensor([2, 3]), 0)
    assert set(empty) == {"loss"} and empty["loss"].item() == 0.0
    empty["loss"].backward()  # an exact zero that still reaches every trained parameter
    grads = [p.grad for p in module.policy.trainable_parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)


def test_no_pairs_no_units(tiny_sd3_path):
    module = make_dpo(tiny_sd3_path)
    module.build_reference()
    rollout = module.rollout(PROMPTS)
    # equal advantages in every group: no pair
    module.set_pairs(dpo_pairs(torch.zeros(4), torch.tensor([0, 0, 1, 1])))
    assert module.training_units(rollout) == []
    assert rollout.forward.pairs.shape == (0, 2)


def test_pairs_come_from_the_advantages(tiny_sd3_path):
    from flowrl.rewards import RewardScores

    module = make_dpo(tiny_sd3_path)
    rewards = torch.tensor([0.1, 0.9, 0.4, 0.2])
    scores = RewardScores(rewards, torch.ones(4, dtype=torch.bool), [], {"r": rewards}, {"r": 1.0})
    advantages = module.compute_advantages(scores, torch.tensor([0, 0, 1, 1]))
    assert advantages.shape == (4,)
    assert module._pairs.tolist() == [[1, 0], [2, 3]]


def test_full_finetuning_reference_is_a_frozen_copy(tiny_sd3_path):
    module = make_dpo(tiny_sd3_path, finetune_type="full")
    rollout, units = prepared(module)
    assert module.dpo_reference.uses_copy  # full fine-tuning: a copy of the trained parameters
    before = rollout.forward.ref_errors.clone()
    with torch.no_grad():
        for p in module.policy.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    module.set_pairs(torch.tensor([[0, 1], [3, 2]]))
    module.training_units(rollout)  # the same iteration: the same draws
    assert torch.equal(rollout.forward.ref_errors, before)  # the reference did not move with the weights
    out = module.training_loss(rollout, torch.zeros(4), torch.arange(4), 0)
    assert out["loss"].item() != pytest.approx(math.log(2.0), abs=1e-7)


def test_checkpoint_keeps_the_original_reference(tiny_sd3_path):
    """A resumed full fine-tuning run keeps the reference of the run that started, not the resumed weights."""
    first = make_dpo(tiny_sd3_path, finetune_type="full")
    first.build_reference()
    original = {n: p.detach().clone() for n, p in first.policy.named_trainable_parameters()}
    with torch.no_grad():
        for p in first.policy.trainable_parameters():
            p.add_(0.01)  # training moved the weights
    checkpoint = {"state_dict": first.state_dict()}
    first.on_save_checkpoint(checkpoint)
    assert checkpoint["flowrl_dpo_reference"]["reference"]
    resumed = make_dpo(tiny_sd3_path, finetune_type="full")
    resumed.on_load_checkpoint(checkpoint)
    with resumed.dpo_reference.reference(resumed):  # built from the resumed weights, then the saved copy applied
        for n, p in resumed.policy.named_trainable_parameters():
            assert torch.equal(p, original[n]), n


def test_a_kl_reference_callback_is_refused(tiny_sd3_path):
    module = make_dpo(tiny_sd3_path)
    module._trainer = SimpleNamespace(callbacks=[ReferenceModel(kl_beta=0.1)], global_rank=0, world_size=1)
    with pytest.raises(ConfigError, match="kl_beta: 0"):
        module.on_fit_start()


# ---------------------------------------------------------------------------------------------- offline module
def test_offline_optimizer_step_on_the_toy_model_from_the_shipped_set(tmp_path):
    dm = PreferenceDataModule("toy:pairs", resolution=32, batch_size=4, shuffle=False)
    assert len(dm.pairs) >= 16
    module = OfflineDPO(PolicyConfig("flowrl:toy", finetune_type="lora", lora_rank=4), rewards=[RewardSpec("shapes")],
                        resolution=32, num_train_timesteps=1, time_sampling_strategy="logit_normal",
                        train_batch_size=8, dpo_beta=1000.0)
    before = {n: p.detach().clone() for n, p in module.policy.named_trainable_parameters()}
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, use_distributed_sampler=False, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 1 and module.iteration == 1
    assert trainer.logged_metrics["train/dpo_pairs"] == 4.0
    assert torch.isfinite(torch.as_tensor(trainer.logged_metrics["train/loss"]))
    assert any(not torch.equal(p, before[n]) for n, p in module.policy.named_trainable_parameters())


def test_offline_pairs_are_the_vae_latents_of_the_images(tiny_sd3_path):
    module = make_module(OfflineDPO, tiny_sd3_path, num_train_timesteps=1)
    chosen, rejected = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    rollout = module.pair_rollout(["a", "b"], chosen, rejected)
    assert rollout.prompts == ["a", "a", "b", "b"] and module._pairs.tolist() == [[0, 1], [2, 3]]
    # the same draw again (seeded by seed, iteration and rank): the same latents
    again = module.pair_rollout(["a", "b"], chosen, rejected)
    assert torch.equal(rollout.final, again.final)
    # the VAE's posterior draw, seeded by (seed, iteration, rank), chosen and rejected interleaved
    seed = int(torch.randint(0, 2**62, (1,), generator=module._generator(0, 0, _VAE_SALT)).item())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        direct = module.policy.adapter.encode_images(torch.cat([chosen, rejected]))
    assert torch.equal(rollout.final, torch.stack([direct[:2], direct[2:]], dim=1).reshape(4, *direct.shape[1:]))
    assert torch.equal(rollout.images[1], rejected[0]) and torch.equal(rollout.images[2], chosen[1])
    with pytest.raises(ValueError, match="one chosen and one rejected"):
        module.pair_rollout(["a"], chosen, rejected)


def test_offline_refuses_a_resolution_other_than_the_datasets(tiny_sd3_path):
    module = make_module(OfflineDPO, tiny_sd3_path, num_train_timesteps=1)  # 16 px
    module._trainer = SimpleNamespace(callbacks=[], datamodule=SimpleNamespace(resolution=(32, 32)))
    with pytest.raises(ConfigError, match=r"set model.resolution: \[32, 32\]"):
        module.on_fit_start()


def test_shipped_set_is_ranked_by_the_verifier():
    import json

    from flowrl.preference_data import read_image
    from flowrl.toy.verifier import ShapesReward

    lines = (TOY_DIR / "preferences" / "pairs.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    reward = ShapesReward()
    for r in records[:12]:
        images = torch.stack([read_image(str(TOY_DIR / "preferences" / r[k])) for k in ("chosen", "rejected")])
        scores = reward(images, [r["prompt"]] * 2)
        assert scores[0] > scores[1], r  # chosen scores higher than rejected, re-read from the PNGs
