"""DGPO: the group preference loss by hand, the group-completeness rule, and one optimizer step on every family."""

from types import SimpleNamespace

import pytest
import torch
from tiny import make_module, randomize_lora

from callbacks import ReferenceModel
from flowrl.algorithms.dgpo import DGPO
from flowrl.errors import ConfigError
from flowrl.losses.dgpo import dgpo_loss

PROMPTS = ["a red circle"] * 2 + ["two squares"] * 2
ADV = torch.tensor([1.5, -1.5, 0.5, -0.5])

# Hand-built micro-batch: 4 samples of 2 "pixels", two groups of two, target eps - x0 = 0.
TARGET = torch.zeros(4, 2)
V = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 0.0], [1.0, 0.0]])  # dsm = mean(v**2) = [1, 2, 0, 0.5]
V_REF = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])  # ref_dsm = [0.5, 1, 1, 0]
A = torch.tensor([1.0, -1.0, 2.0, -2.0])
GROUPS = torch.tensor([7, 7, 3, 3])  # any labels
# S_0 = (1 * (1 - 0.5) + (-1) * (2 - 1)) / 2 = -0.25 ; S_1 = (2 * (0 - 1) + (-2) * (0.5 - 0)) / 2 = -1.5
W0, W1 = 0.43782349911420193, 0.18242552380635635  # sigmoid(-0.25), sigmoid(-1.5)


def hand_loss(**kw):
    args = dict(v=V.clone().requires_grad_(True), v_ref=V_REF, target=TARGET, advantages=A, group_ids=GROUPS,
                group_size=2, dpo_beta=1.0, adv_clip_range=5.0)
    args.update(kw)
    return args["v"], dgpo_loss(**args)


def test_loss_and_gradient_by_hand():
    v, out = hand_loss()
    # mean(w * A * dsm) = (W0 * 1 * 1 + W0 * (-1) * 2 + W1 * 2 * 0 + W1 * (-2) * 0.5) / 4 = -(W0 + W1) / 4
    assert out["loss"].dtype == torch.float32
    assert out["loss"].item() == pytest.approx(-0.15506225573013957, abs=1e-7)
    assert out["group_weight_mean"].item() == pytest.approx((W0 + W1) / 2, abs=1e-7)
    assert out["dsm_loss"].item() == pytest.approx(0.875) and out["ref_dsm_loss"].item() == pytest.approx(0.625)
    out["loss"].backward()
    # d dsm_i / d v_i = v_i (mean over 2 dims of v**2), so d loss / d v_i = w_i * A_i * v_i / 4
    expected = torch.tensor([[W0 / 4, W0 / 4], [-W0 * 2 / 4, 0.0], [0.0, 0.0], [-W1 * 2 / 4, 0.0]])
    torch.testing.assert_close(v.grad, expected)


def test_dpo_beta_scales_the_group_score_and_adv_clip_clamps():
    # dpo_beta 4: S_0 = -1, S_1 = -6; advantages clamped to [-1.5, 1.5] first: S_1 = 4 * (1.5 * -1 - 1.5 * 0.5) / 2 = -4.5
    _, out = hand_loss(dpo_beta=4.0, adv_clip_range=1.5)
    w0, w1 = 0.2689414213699951, 0.01098694263059318  # sigmoid(-1), sigmoid(-4.5)
    # (w0 * 1 - w0 * 2 + w1 * 1.5 * 0 - w1 * 1.5 * 0.5) / 4
    assert out["loss"].item() == pytest.approx((-w0 - 0.75 * w1) / 4, abs=1e-7)


def test_all_equal_rewards_give_no_gradient_and_weight_one_half():
    v, out = hand_loss(advantages=torch.zeros(4))
    assert out["loss"].item() == 0.0 and out["group_weight_mean"].item() == 0.5
    out["loss"].backward()
    assert torch.equal(v.grad, torch.zeros(4, 2))


def test_a_group_of_two_with_one_masked_sample():
    # sample 3 dropped: S_1 = 2 * (0 - 1) / 2 = -1 ; loss over the 3 kept = (W0 * 1 - W0 * 2 + w1 * 2 * 0) / 3
    v, out = hand_loss(mask=torch.tensor([True, True, True, False]))
    assert out["loss"].item() == pytest.approx(-0.43782349911420193 / 3, abs=1e-7)
    assert out["group_weight_mean"].item() == pytest.approx((2 * W0 + 0.2689414213699951) / 3, abs=1e-7)
    out["loss"].backward()
    assert torch.equal(v.grad[3], torch.zeros(2))


def test_dsm_clip_stops_the_gradient_of_samples_past_the_clip_range():
    # old_dsm = [2, 2, 0, 0.5]: ratio exp(old_dsm - dsm) = [e, 1, 1, 1]; sample 0 (A > 0) is above 1 + 0.01: clipped
    v_old = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    v, out = hand_loss(v_old=v_old, clip_range=0.01)
    assert out["loss"].item() == pytest.approx(-0.15506225573013957, abs=1e-7)  # the value is unchanged
    assert out["clip_fraction"].item() == 0.25
    out["loss"].backward()
    assert torch.equal(v.grad[0], torch.zeros(2)) and v.grad[1, 0] != 0
    # A <= 0 clips below: old_dsm of sample 1 = 0 -> ratio exp(-2) < 0.99
    v_old[1] = 0.0
    _, out = hand_loss(v_old=v_old, clip_range=[-0.01, 0.01])
    assert out["clip_fraction"].item() == 0.5


def test_kl_term_to_the_reference():
    # kl_beta * mean((v - 0)**2) = 0.1 * (1 + 1 + 4 + 0 + 0 + 0 + 1 + 0) / 8 = 0.0875
    v, out = hand_loss(v_kl_ref=torch.zeros(4, 2), kl_beta=0.1)
    assert out["kl_loss"].item() == pytest.approx(0.875)
    assert out["loss"].item() == pytest.approx(-0.15506225573013957 + 0.0875, abs=1e-7)
    with pytest.raises(ValueError, match="kl_beta"):
        hand_loss(kl_beta=0.1)


def test_bf16_inputs_are_computed_in_float32():
    # 257 is not a bf16 number: the inputs are rounded once to bf16, then everything is float32
    v = torch.tensor([[257.0, 1.0], [3.0, 0.0], [0.5, 0.25], [1.0, 2.0]])
    ref = torch.tensor([[256.0, 1.0], [2.0, 1.0], [0.5, 0.0], [1.0, 1.0]])
    v16, ref16 = v.bfloat16().requires_grad_(True), ref.bfloat16()
    out16 = dgpo_loss(v16, ref16, TARGET.bfloat16(), A.bfloat16(), GROUPS, 2, 0.01)
    out32 = dgpo_loss(v16.detach().float(), ref16.float(), TARGET, A, GROUPS, 2, 0.01)
    assert out16["loss"].dtype == torch.float32
    assert out16["loss"].item() == out32["loss"].item()
    # 257 arrives as 256; sample 0's dsm (256**2 + 1) / 2 = 32768.5 is exact in float32 (bf16 rounds it to 32768)
    assert out16["dsm_loss"].item() == (32768.5 + 9 / 2 + (0.25 + 0.0625) / 2 + 5 / 2) / 4
    out16["loss"].backward()
    assert v16.grad.dtype == torch.bfloat16 and torch.isfinite(v16.grad.float()).all()


# ---------------------------------------------------------------- the algorithm
def make_dgpo(path, **kw):
    return make_module(DGPO, path, **{"num_train_timesteps": 2, "train_batch_size": 4, **kw})


def attach(module, *callbacks):
    module._trainer = SimpleNamespace(callbacks=list(callbacks), global_rank=0, world_size=1)
    return module


@pytest.mark.parametrize("kw, match", [
    (dict(dpo_beta=0.0), r"dpo_beta=0.0 is out of range: it must be > 0"),
    (dict(dpo_beta=float("nan")), r"dpo_beta=nan is out of range: it must be > 0"),
    (dict(clip_range=0.0), r"clip_range=0.0 is out of range: it must be > 0"),
    (dict(clip_range=[0.1, 0.2]), r"a \[low, high\] pair needs finite low < 0 < high"),
    (dict(train_batch_size=3), r"train_batch_size=3 is not a multiple of group_size=2.*set train_batch_size to a "
                               r"multiple of group_size \(e.g. 2\) or null"),
    (dict(group_size=4, train_batch_size=6), r"multiple of group_size \(e.g. 4\)"),
    (dict(num_inner_epochs=2), r"num_inner_epochs=2.*set num_inner_epochs: 1"),
])
def test_bad_options_are_refused(tiny_sd3_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        make_dgpo(tiny_sd3_path, **kw)


def test_whole_groups_share_training_times_and_noise_and_the_reference_is_the_base_model(tiny_sd3_path):
    module = make_dgpo(tiny_sd3_path)
    randomize_lora(module)
    rollout = module.rollout(PROMPTS)
    assert rollout.group_ids.tolist() == [0, 0, 1, 1]  # no group_ids given: blocks of group_size equal prompts
    module.training_units(rollout)
    f = rollout.forward
    for a, b in [(0, 1), (2, 3)]:
        assert torch.equal(f.times[a], f.times[b]) and torch.equal(f.noise[:, a], f.noise[:, b])
    assert not torch.equal(f.noise[:, 0], f.noise[:, 2])
    # group 0's draw is what sample 0 draws without sharing (keyed by the group's first sample)
    plain = make_dgpo(tiny_sd3_path, use_shared_noise=False)
    plain.policy.load_state_dict(module.policy.state_dict())
    other = plain.rollout(PROMPTS)
    plain.training_units(other)
    assert torch.equal(other.forward.noise[:, 0], f.noise[:, 0]) and torch.equal(other.forward.noise[:, 2], f.noise[:, 2])
    assert not torch.equal(other.forward.noise[:, 1], f.noise[:, 1])
    # no ReferenceModel, LoRA: the DGPO reference is the adapter-disabled base model
    x_t, x0, eps, t = module.noised(rollout, torch.arange(4), 1)
    with module.policy.adapter_disabled(), torch.no_grad():
        v_base = module.policy.velocity(x_t, t, rollout.cond, 1.0)
    torch.testing.assert_close(f.v_ref[1], v_base)
    out = module.training_loss(rollout, ADV, torch.arange(4), 1)
    v = module.policy.velocity(x_t, t, rollout.cond, 1.0)
    expected = dgpo_loss(v, f.v_ref[1], eps - x0, ADV, torch.tensor([0, 0, 1, 1]), 2, 100.0, 5.0, v_old=f.v_old[1],
                         clip_range=1e-2)
    torch.testing.assert_close(out["loss"], expected["loss"])
    assert out["loss"].requires_grad


def test_use_ema_ref_compares_with_the_old_policy(tiny_sd3_path):
    module = make_dgpo(tiny_sd3_path, use_ema_ref=True, clip_dsm=False)
    randomize_lora(module)
    rollout = module.rollout(PROMPTS)
    module.training_units(rollout)
    assert rollout.forward.v_ref is None  # no frozen reference is evaluated
    out = module.training_loss(rollout, ADV, torch.arange(4), 0)
    # on-policy before any update the old policy is the live one: every group's score is 0, its weight 1/2
    assert out["group_weight_mean"].item() == 0.5


def test_a_micro_batch_with_part_of_a_group_is_refused(tiny_sd3_path):
    module = make_dgpo(tiny_sd3_path)
    rollout = module.rollout(PROMPTS)
    module.training_units(rollout)
    with pytest.raises(RuntimeError, match=r"part of a group.*train_batch_size that is a multiple of group_size"):
        module.training_loss(rollout, ADV, torch.tensor([0, 1, 2]), 0)
    with pytest.raises(ValueError, match="pass group_ids"):
        module.rollout(["a", "b", "a", "b"])


def test_full_finetuning_needs_a_frozen_reference(tiny_sd3_path):
    module = attach(make_dgpo(tiny_sd3_path, finetune_type="full"))
    with pytest.raises(ConfigError, match="add it to trainer.callbacks.*finetune_type: lora.*use_ema_ref: true"):
        module.on_fit_start()
    attach(make_dgpo(tiny_sd3_path, finetune_type="full", use_ema_ref=True)).check_frozen_reference()
    attach(make_dgpo(tiny_sd3_path, finetune_type="full"), ReferenceModel(kl_beta=0.1)).check_frozen_reference()
