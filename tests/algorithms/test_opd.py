"""DiffusionOPD (flowrl.algorithms.opd.DiffusionOPD): the distillation loss on hand-computed numbers, teachers loaded
from a LoRA export, an exported model and a checkpoint (each reproducing the model it was saved from), a student
distilled from itself has loss and gradient exactly 0, the loss on a rollout equals the formula with the teachers'
own velocities, ODE and SDE, and its options' checks. The one-step test on every family is the families' contract."""

import lightning as L
import pytest
import torch
from tiny import fit_one_iteration, make_module, randomize_lora, save_teacher_checkpoint

from callbacks import ReferenceModel
from flowrl.algorithms import NFT, DiffusionOPD
from flowrl.errors import ConfigError
from flowrl.export import export_policy
from flowrl.losses.opd import opd_loss
from flowrl.policy import FlowMatchingPolicy
from flowrl.policy.teacher import frozen_denoiser, teacher_kind

PROMPTS = ["a red circle"] * 2 + ["two squares"] * 2

# ----------------------------------------------------------------------------------------- the pure function


def test_opd_loss_by_hand():
    # student (1, 2), (3, 3); teacher a (0, 0), (2, 4): squares (1, 4) mean 2.5 and (1, 1) mean 1 -> halves 1.25, 0.5
    # teacher b equal to the student: 0, 0.  weights a 2, b 1: per sample 2.5, 1.0 -> mean 1.75
    mean = torch.tensor([[1.0, 2.0], [3.0, 3.0]])
    a, b = torch.tensor([[0.0, 0.0], [2.0, 4.0]]), mean.clone()
    out = opd_loss(mean, {"a": a, "b": b}, {"a": 2.0, "b": 1.0})
    assert torch.allclose(out["loss"], torch.tensor(1.75)) and torch.allclose(out["distill_kl"], torch.tensor(1.75))
    assert torch.allclose(out["distill_kl_a"], torch.tensor(0.875)) and out["distill_kl_b"] == 0
    # with the step's std (0.5, 2): a's KL 1.25 / 0.25 = 5 and 0.5 / 4 = 0.125; times 2, mean = 5.125; coef 0.5
    std = torch.tensor([0.5, 2.0]).reshape(2, 1)
    out = opd_loss(mean, {"a": a, "b": b}, {"a": 2.0, "b": 1.0}, std, coef=0.5)
    assert torch.allclose(out["loss"], torch.tensor(0.5 * 5.125))


def test_opd_loss_single_teacher_gradient_and_float32():
    mean = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.tensor([[0.0, 0.0]], dtype=torch.bfloat16, requires_grad=True)
    out = opd_loss(mean, {"t": teacher}, {"t": 1.0})
    assert out["loss"].dtype == torch.float32
    out["loss"].backward()
    # d/dm mean((m - t)^2) / 2 = (m - t) / 2 per dim; nothing reaches the teacher
    assert torch.allclose(mean.grad.float(), torch.tensor([[0.5, 1.0]])) and teacher.grad is None


def test_opd_loss_minimiser_is_the_weighted_mean_of_the_teachers():
    a, b = torch.zeros(1, 3), torch.full((1, 3), 3.0)
    losses = {float(m): float(opd_loss(torch.full((1, 3), m), {"a": a, "b": b}, {"a": 2.0, "b": 1.0})["loss"])
              for m in torch.linspace(0, 3, 31)}
    assert min(losses, key=losses.get) == pytest.approx(1.0)  # (2 * 0 + 1 * 3) / 3


def test_opd_loss_refuses_teachers_without_weights():
    with pytest.raises(ValueError, match="weight"):
        opd_loss(torch.zeros(1, 2), {"a": torch.zeros(1, 2)}, {"b": 1.0})


# ----------------------------------------------------------------------------------------- teachers


def velocity_of(policy, denoiser=None, guidance=3.0):
    cond = policy.encode_prompt(["a red circle", "two squares"])
    x = policy.prepare_latents(2, 16, 16, torch.Generator().manual_seed(3))
    with torch.no_grad():
        return policy.velocity(x, torch.tensor([0.9, 0.4]), cond, guidance, denoiser=denoiser)


def test_a_lora_export_teaches_the_model_it_was_exported_from(tiny_sd3_path, tmp_path):
    trained = FlowMatchingPolicy.from_pretrained(tiny_sd3_path, finetune_type="lora", lora_rank=4)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in trained.trainable_parameters():
            p.normal_(0, 0.05)
    export_policy(trained, tmp_path / "lora")
    student = FlowMatchingPolicy.from_pretrained(tiny_sd3_path, finetune_type="lora", lora_rank=8)  # another rank
    for source in (tmp_path / "lora", tmp_path / "lora" / "pytorch_lora_weights.safetensors"):
        assert teacher_kind(str(source)) == "lora"
        teacher = frozen_denoiser(student, str(source))
        assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
        assert not getattr(teacher, "peft_config", None)  # merged: a plain denoiser
        torch.testing.assert_close(velocity_of(student, teacher), velocity_of(trained), rtol=1e-4, atol=1e-5)
    # the student is untouched: still its own (zero-B) LoRA, equal to the base model
    base = FlowMatchingPolicy.from_pretrained(tiny_sd3_path, finetune_type="full")
    torch.testing.assert_close(velocity_of(student), velocity_of(base), rtol=1e-5, atol=1e-6)


def test_an_exported_model_teaches_the_model_it_was_exported_from(tiny_sd3_path, tmp_path):
    trained = FlowMatchingPolicy.from_pretrained(tiny_sd3_path, finetune_type="full")
    with torch.no_grad():
        for p in trained.transformer.parameters():
            p.add_(0.01 * torch.randn_like(p))
    export_policy(trained, tmp_path / "full")
    student = FlowMatchingPolicy.from_pretrained(tiny_sd3_path, finetune_type="lora", lora_rank=4)
    assert teacher_kind(str(tmp_path / "full")) == "model"
    assert teacher_kind(str(tmp_path / "full" / "transformer")) == "model"
    for source in (tmp_path / "full", tmp_path / "full" / "transformer"):
        teacher = frozen_denoiser(student, str(source))
        torch.testing.assert_close(velocity_of(student, teacher), velocity_of(trained), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("finetune_type", ["lora", "full"])
def test_a_checkpoint_teaches_the_model_it_was_saved_from(tiny_sd3_path, tmp_path, finetune_type):
    saved = make_module(NFT, tiny_sd3_path, finetune_type=finetune_type, num_train_timesteps=1)
    if finetune_type == "lora":
        ckpt = save_teacher_checkpoint(saved, tmp_path / "t.ckpt")
    else:
        with torch.no_grad():
            for p in saved.policy.transformer.parameters():
                p.add_(0.01 * torch.randn_like(p))
        ckpt = str(tmp_path / "t.ckpt")
        torch.save({"state_dict": {n: p.detach() for n, p in saved.named_parameters() if p.requires_grad}}, ckpt)
    student = make_module(NFT, tiny_sd3_path, finetune_type=finetune_type, num_train_timesteps=1).policy
    teacher = frozen_denoiser(student, ckpt)
    assert not getattr(teacher, "peft_config", None)
    torch.testing.assert_close(velocity_of(student, teacher), velocity_of(saved.policy), rtol=1e-4, atol=1e-5)


def test_bad_teachers_fail_in_one_line_naming_the_file(tiny_sd3_path, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        teacher_kind(str(tmp_path / "nowhere"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="notes.txt.*is not a LoRA"):
        teacher_kind(str(tmp_path / "notes.txt"))
    # a checkpoint of another LoRA rank does not fit the student
    ckpt = save_teacher_checkpoint(make_module(NFT, tiny_sd3_path, lora_rank=2, num_train_timesteps=1),
                                   tmp_path / "r2.ckpt")
    student = FlowMatchingPolicy.from_pretrained(tiny_sd3_path, finetune_type="lora", lora_rank=4)
    with pytest.raises(ConfigError, match="r2.ckpt.*not trained with this policy's finetune_type"):
        frozen_denoiser(student, ckpt)


# ----------------------------------------------------------------------------------------- the algorithm


def make_opd(path, teachers, **kw):
    return make_module(DiffusionOPD, path, teachers=teachers, **kw)


def test_a_student_distilled_from_itself_has_loss_and_gradient_exactly_zero(tiny_sd3_path, tmp_path):
    """The teacher is a checkpoint of the student's own weights: its means are the student's, bit for bit."""
    student = make_module(NFT, tiny_sd3_path, num_train_timesteps=1)
    ckpt = save_teacher_checkpoint(student, tmp_path / "self.ckpt")
    module = make_opd(tiny_sd3_path, [{"path": ckpt}])
    module.policy.load_state_dict(student.policy.state_dict())
    rollout = module.rollout(PROMPTS)
    terms = module.training_loss(rollout, torch.zeros(4), torch.arange(2), 0)
    terms["loss"].backward()
    # the fused teacher and the LoRA student round differently: zero up to float32 rounding
    assert terms["loss"] < 1e-10
    assert all(p.grad is None or p.grad.abs().max() < 1e-6 for p in module.policy.trainable_parameters())


@pytest.mark.parametrize("dynamics_type, noise_level, add_kl_coefficient", [
    ("ODE", None, False), ("Flow-SDE", 0.7, True), ("CPS", 0.5, False)])
def test_loss_is_the_formula_with_each_teachers_velocity(tiny_sd3_path, tmp_path, dynamics_type, noise_level,
                                                         add_kl_coefficient):
    paths = [save_teacher_checkpoint(make_module(NFT, tiny_sd3_path, num_train_timesteps=1), tmp_path / f"{i}.ckpt",
                                     seed=i) for i in range(2)]
    teachers = [{"path": paths[0], "weight": 2.0, "name": "a"},
                {"path": paths[1], "weight": 0.5, "name": "b", "guidance_scale": 1.0}]
    extra = {"noise_level": noise_level} if noise_level is not None else {}
    module = make_opd(tiny_sd3_path, teachers, dynamics_type=dynamics_type, add_kl_coefficient=add_kl_coefficient,
                      pathwise_coef=0.5, **extra)
    assert module.dynamics.name == dynamics_type
    rollout = module.rollout(PROMPTS)
    idx, k = torch.arange(4), 1
    terms = module.training_loss(rollout, torch.zeros(4), idx, k)
    step = rollout.train_steps[k]
    s, s_next = rollout.sigmas[step].item(), rollout.sigmas[step + 1].item()
    x, prev, cond = rollout.latents[idx, k], rollout.next_latents[idx, k], rollout.cond.select(idx)
    with torch.no_grad():
        out = module.dynamics.step(x, module.policy.velocity(x, s, cond, 3.0), s, s_next, prev_sample=prev)
        expected = 0.0
        for j, (w, g) in enumerate([(2.0, 3.0), (0.5, 1.0)]):
            v = module.policy.velocity(x, s, cond, g, denoiser=module.teachers[j])
            mu = module.dynamics.step(x, v, s, s_next, prev_sample=prev).mean
            d = (out.std.reshape(-1) ** 2) if add_kl_coefficient else torch.ones(4)
            kl = ((out.mean - mu) ** 2).reshape(4, -1).mean(1) / (2 * d)
            torch.testing.assert_close(terms[f"distill_kl_{'ab'[j]}"], kl.mean())
            expected = expected + w * kl
    torch.testing.assert_close(terms["loss"], 0.5 * expected.mean())
    assert terms["loss"] > 0 and terms["loss"].requires_grad


def test_its_gradient_moves_the_student_to_its_teacher(tiny_sd3_path, tmp_path):
    """A full fine-tune student of a LoRA teacher (exported): Adam steps on the loss of one rollout (every trained
    step) cut it more than twofold."""
    teacher = make_module(NFT, tiny_sd3_path, num_train_timesteps=1)
    save_teacher_checkpoint(teacher, tmp_path / "t.ckpt", std=0.2)
    export_policy(teacher.policy, tmp_path / "lora")
    torch.manual_seed(0)
    module = make_opd(tiny_sd3_path, [{"path": str(tmp_path / "lora")}], finetune_type="full")
    rollout = module.rollout(PROMPTS)
    optimizer = torch.optim.Adam(module.policy.trainable_parameters(), lr=1e-3)

    def loss():
        return sum(module.training_loss(rollout, torch.zeros(4), torch.arange(4), k)["loss"]
                   for k in module.training_units(rollout))

    before = float(loss())
    for _ in range(12):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    after = float(loss())
    assert after < 0.5 * before, (before, after)


def test_fit_logs_each_teachers_kl_and_the_monitored_reward(tiny_sd3_path, tmp_path, prompt_file):
    paths = [save_teacher_checkpoint(make_module(NFT, tiny_sd3_path, num_train_timesteps=1), tmp_path / f"{i}.ckpt",
                                     seed=i) for i in range(2)]
    module = make_opd(tiny_sd3_path, [{"path": paths[0], "name": "a"}, {"path": paths[1], "name": "b", "weight": 0.5}])
    trainer = fit_one_iteration(module, prompt_file)
    logged = trainer.logged_metrics
    assert trainer.global_step >= 1
    for key in ("train/loss", "train/distill_kl", "train/distill_kl_a", "train/distill_kl_b", "train/reward_mean"):
        assert key in logged and torch.isfinite(torch.as_tensor(logged[key])), key
    assert torch.isclose(torch.as_tensor(logged["train/distill_kl"]),
                         torch.as_tensor(logged["train/distill_kl_a"] + 0.5 * logged["train/distill_kl_b"]), rtol=1e-4)


def test_options_are_checked_before_loading(tiny_sd3_path, tmp_path):
    ckpt = save_teacher_checkpoint(make_module(NFT, tiny_sd3_path, num_train_timesteps=1), tmp_path / "t.ckpt")
    cases = [
        ({"teachers": []}, "at least one teacher"),
        ({"teachers": [{"path": str(tmp_path / "missing")}]}, "missing' does not exist"),
        ({"teachers": [{"path": ckpt, "weight": 0.0}]}, r"teachers\[0\].weight=0.0: it must be a finite number > 0"),
        ({"teachers": [{"path": ckpt, "guidance_scale": 0.5}]}, r"teachers\[0\].guidance_scale"),
        ({"teachers": [{"path": ckpt, "name": "x"}, {"path": ckpt, "name": "x"}]}, "repeat"),
        ({"teachers": [{"path": ckpt}], "pathwise_coef": 0.0}, "pathwise_coef"),
        ({"teachers": [{"path": ckpt}], "add_kl_coefficient": True}, "add_kl_coefficient divides by the step's"),
    ]
    for options, message in cases:
        with pytest.raises(ConfigError, match=message):
            make_module(DiffusionOPD, tiny_sd3_path, **options)


def test_a_kl_reference_is_refused(tiny_sd3_path, tmp_path, prompt_file):
    ckpt = save_teacher_checkpoint(make_module(NFT, tiny_sd3_path, num_train_timesteps=1), tmp_path / "t.ckpt")
    module = make_opd(tiny_sd3_path, [{"path": ckpt}])
    from flowrl.data import PromptDataModule

    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, use_distributed_sampler=False, callbacks=[ReferenceModel(kl_beta=0.1)])
    with pytest.raises(ConfigError, match="anchor is its teachers"):
        trainer.fit(module, datamodule=PromptDataModule(prompt_file, group_size=2, batch_size=4))


def test_checkpoints_hold_the_student_only(tiny_sd3_path, tmp_path):
    ckpt = save_teacher_checkpoint(make_module(NFT, tiny_sd3_path, num_train_timesteps=1), tmp_path / "t.ckpt")
    module = make_opd(tiny_sd3_path, [{"path": ckpt}])
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("policy.transformer.") and "lora" in n for n in trained)
    module.train()
    assert not module.teachers[0].training
    randomize_lora(module)  # the student moves; the teacher does not
    assert not any(p.requires_grad for p in module.teachers.parameters())
