"""CRD: the centered reward-matching loss by hand, the group rule, the CFG-guided KL reference, and one optimizer
step on every family."""

from types import SimpleNamespace

import pytest
import torch
from tiny import make_module, randomize_lora

from callbacks import ReferenceModel
from flowrl.algorithms.crd import CRD
from flowrl.errors import ConfigError
from flowrl.losses.crd import crd_loss, implicit_reward

PROMPTS = ["a red circle"] * 2 + ["two squares"] * 2
ADV = torch.tensor([1.5, -1.5, 0.5, -0.5])

# Hand-built micro-batch: 4 samples of 2 "pixels", two groups of two, target eps - x0 = 0, old velocity 0.
TARGET = torch.zeros(4, 2)
V = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 0.0], [1.0, 0.0]])  # mean((v - 0)**2) = [1, 2, 0, 0.5]
V_OLD = torch.zeros(4, 2)  # its error is 0: r_theta = -[1, 2, 0, 0.5] (plain), -[1, 2, 0, 1] (adaptive)
A = torch.tensor([1.0, -1.0, 2.5, -2.5])  # c = 5: r = A / 10 + 0.5 = [0.6, 0.4, 0.75, 0.25]
GROUPS = torch.tensor([4, 4, 9, 9])


def hand(**kw):
    args = dict(v=V.clone().requires_grad_(True), v_old=V_OLD, target=TARGET, advantages=A, group_ids=GROUPS,
                crd_beta=1.0, adv_clip_range=5.0, adaptive_logp=False)
    args.update(kw)
    return args["v"], crd_loss(**args)


def test_implicit_reward_by_hand():
    assert implicit_reward(V, V_OLD, TARGET, adaptive_logp=False).tolist() == [-1.0, -2.0, 0.0, -0.5]
    # adaptive: each error over its own mean |error| (clamped at 1e-5): [1/1, 2/1, 0/1e-5, 0.5/0.5]; old: 0/1e-5
    assert implicit_reward(V, V_OLD, TARGET, adaptive_logp=True).tolist() == [-1.0, -2.0, 0.0, -1.0]


def test_mse_loss_and_gradient_by_hand():
    # centred within groups: R = r - mean_g(r) = [0.1, -0.1, 0.25, -0.25]
    # r_theta = [-1, -2, 0, -0.5] -> Rt = [0.5, -0.5, 0.25, -0.25]; beta Rt - R = [0.4, -0.4, 0, 0]
    # L = (0.16 + 0.16 + 0 + 0) / 4 = 0.08; policy_loss = L * c / beta = 0.4
    v, out = hand()
    assert out["loss"].dtype == torch.float32
    assert out["loss"].item() == pytest.approx(0.4, abs=1e-6)
    assert out["unweighted_policy_loss"].item() == pytest.approx(0.08, abs=1e-7)
    assert out["r_mean"].item() == pytest.approx(0.5) and out["r_theta_mean"].item() == pytest.approx(-0.875)
    out["loss"].backward()
    # d loss / d r_theta_i = 5 * 2 * diff_i / 4 (the group mean is detached); d r_theta_i / d v_i = -v_i
    # sample 0: 2.5 * 0.4 * -[1, 1] = [-1, -1]; sample 1: 2.5 * -0.4 * -[2, 0] = [2, 0]; samples 2, 3: 0
    torch.testing.assert_close(v.grad, torch.tensor([[-1.0, -1.0], [2.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))


def test_crd_beta_and_adaptive_logp():
    # beta 2: 2 Rt - R = [0.9, -0.9, 0.25, -0.25] -> L = (0.81 * 2 + 0.0625 * 2) / 4 = 0.43625; * 5 / 2 = 1.090625
    assert hand(crd_beta=2.0)[1]["loss"].item() == pytest.approx(1.090625, abs=1e-6)
    # adaptive: r_theta = [-1, -2, 0, -1] -> Rt = [0.5, -0.5, 0.5, -0.5]; diff = [0.4, -0.4, 0.25, -0.25]
    # L = (0.16 * 2 + 0.0625 * 2) / 4 = 0.11125; * 5 = 0.55625
    assert hand(adaptive_logp=True)[1]["loss"].item() == pytest.approx(0.55625, abs=1e-6)


def test_bce_loss_by_hand():
    # BCE_logits(x, y) = log(1 + e^x) - x y with x = Rt, y = sigmoid(R):
    # (x, R) = (0.5, 0.1), (-0.5, -0.1), (0.25, 0.25), (-0.25, -0.25); their mean is 0.6984913425490153
    _, out = hand(crd_loss_type="bce")
    assert out["unweighted_policy_loss"].item() == pytest.approx(0.6984913425490153, abs=1e-6)
    assert out["loss"].item() == pytest.approx(5 * 0.6984913425490153, abs=1e-5)


def test_hard_two_direction_centering():
    # weight_temp 0: the "+" centre of a group is its positive-advantage sample, the "-" centre its negative one.
    # group 4: r = [0.6, 0.4], r_theta = [-1, -2]: "+": R = [0, -0.2], Rt = [0, -1] -> diff [0, -0.8];
    #          "-": R = [0.2, 0], Rt = [1, 0] -> diff [0.8, 0]
    # group 9: r = [0.75, 0.25], r_theta = [0, -0.5]: "+" R = Rt = [0, -0.5], "-" R = Rt = [0.5, 0] -> diff 0
    # L = (0.64 / 4 + 0.64 / 4) / 2 = 0.16; * 5 = 0.8
    assert hand(weight_temp=0.0)[1]["loss"].item() == pytest.approx(0.8, abs=1e-6)
    # a softmax temperature in between gives a loss between the uniform (0.4) and the hard one
    assert 0.4 < hand(weight_temp=0.1)[1]["loss"].item() < 0.8


def test_all_equal_rewards_in_a_group_pull_the_implicit_rewards_together():
    # A = 0 everywhere: R = 0, the loss is mean((beta Rt)**2) * c / beta = (0.25 * 2 + 0.0625 * 2) / 4 * 5
    _, out = hand(advantages=torch.zeros(4))
    assert out["loss"].item() == pytest.approx(0.78125, abs=1e-6)
    # ... and zero once the implicit rewards are equal within each group
    v, out = hand(advantages=torch.zeros(4), v=torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 2.0], [2.0, 0.0]],
                                                             requires_grad=True))
    assert out["loss"].item() == 0.0


def test_a_masked_sample_leaves_its_group():
    # sample 3 dropped: group 9 is sample 2 alone (R = Rt = 0); group 4 as before: (0.16 + 0.16) / 3 * 5
    v, out = hand(mask=torch.tensor([True, True, True, False]))
    assert out["loss"].item() == pytest.approx(0.32 / 3 * 5, abs=1e-6)
    out["loss"].backward()
    assert torch.equal(v.grad[2:], torch.zeros(2, 2))


def test_reward_adaptive_kl_by_hand():
    # kl = mean((v - 0)**2) = [1, 2, 0, 0.5]; floor m = 1e-4 / 0.1 = 1e-3; weights m + r (1 - m) =
    # [0.6004, 0.4006, 0.75025, 0.25075]; kl_loss = 0.1 * (0.6004 + 0.8012 + 0 + 0.125375) / 4 = 0.038174375
    _, out = hand(v_ref=torch.zeros(4, 2), kl_beta=0.1)
    assert out["kl_loss"].item() == pytest.approx(0.038174375, abs=1e-8)
    assert out["loss"].item() == pytest.approx(0.4 + 0.038174375, abs=1e-6)
    # plain: 0.1 * mean(kl) = 0.1 * 3.5 / 4
    assert hand(v_ref=torch.zeros(4, 2), kl_beta=0.1, reward_adaptive_kl=False)[1]["kl_loss"].item() == \
        pytest.approx(0.0875, abs=1e-8)
    with pytest.raises(ValueError, match="kl_beta"):
        hand(kl_beta=0.1)


def test_bf16_inputs_are_computed_in_float32():
    v16 = V.bfloat16().requires_grad_(True)
    out16 = crd_loss(v16, V_OLD.bfloat16(), TARGET.bfloat16(), A.bfloat16(), GROUPS, 1.0, 5.0, False)
    assert out16["loss"].dtype == torch.float32 and out16["loss"].item() == pytest.approx(0.4, abs=1e-6)
    # 1.01 is not a bf16 number (it arrives as 1.0078125); the matching then runs in float32
    big = torch.tensor([[1.01, 1.0], [2.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    ref = crd_loss(big.bfloat16().float(), V_OLD, TARGET, A, GROUPS, 1.0, 5.0, False)["loss"]
    assert crd_loss(big.bfloat16(), V_OLD.bfloat16(), TARGET.bfloat16(), A.bfloat16(), GROUPS, 1.0, 5.0,
                    False)["loss"].item() == ref.item()
    out16["loss"].backward()
    assert v16.grad.dtype == torch.bfloat16


# ---------------------------------------------------------------- the algorithm
def make_crd(path, **kw):
    return make_module(CRD, path, **{"num_train_timesteps": 2, "train_batch_size": 4, "kl_cfg": 3.0, **kw})


@pytest.mark.parametrize("kw, match", [
    (dict(crd_beta=0.0), r"crd_beta=0.0 is out of range: it must be > 0"),
    (dict(crd_loss_type="hinge"), r"unknown crd_loss_type 'hinge'; choose one of mse, bce"),
    (dict(weight_temp=float("inf")), r"weight_temp=inf: it must be a finite number \(< 0: uniform"),
    (dict(kl_cfg=0.5), r"kl_cfg=0.5 is out of range: it must be >= 1.0"),
    (dict(adv_clip_range=None), r"adv_clip_range must be a number > 0.*crd maps the clamped advantages"),
    (dict(train_batch_size=3), r"train_batch_size=3 is not a multiple of group_size=2"),
    (dict(num_inner_epochs=3), r"num_inner_epochs=3.*set num_inner_epochs: 1"),
])
def test_bad_options_are_refused(tiny_sd3_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        make_crd(tiny_sd3_path, **kw)


def test_training_loss_and_the_cfg_guided_kl_reference(tiny_sd3_path):
    module = make_crd(tiny_sd3_path)
    randomize_lora(module)
    ref = ReferenceModel(kl_beta=0.5)
    module._trainer = SimpleNamespace(callbacks=[ref], global_rank=0, world_size=1)
    ref.build(module)
    rollout = module.rollout(PROMPTS)
    module.training_units(rollout)
    f = rollout.forward
    idx = torch.arange(4)
    x_t, x0, eps, t = module.noised(rollout, idx, 1)
    with module.policy.adapter_disabled(), torch.no_grad():
        v_base_cfg = module.policy.velocity(x_t, t, rollout.cond, 3.0)  # the base model at guidance kl_cfg
        v_base = module.policy.velocity(x_t, t, rollout.cond, 1.0)
    torch.testing.assert_close(f.v_ref[1], v_base_cfg)
    assert not torch.allclose(f.v_ref[1], v_base)
    out = module.training_loss(rollout, ADV, idx, 1)
    v = module.policy.velocity(x_t, t, rollout.cond, 1.0)
    # on-policy before an update the old velocity is the live one: the implicit rewards are 0
    assert out["r_theta_mean"].item() == 0.0
    expected = crd_loss(v, f.v_old[1], eps - x0, ADV, torch.tensor([0, 0, 1, 1]), 1.0, 5.0, True, "mse", -1.0,
                        f.v_ref[1], 0.5, True)
    torch.testing.assert_close(out["loss"], expected["loss"])
    assert out["kl_loss"] > 0
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.policy.trainable_parameters())
    with pytest.raises(RuntimeError, match="part of a group"):
        module.training_loss(rollout, ADV, torch.tensor([1, 2]), 0)
