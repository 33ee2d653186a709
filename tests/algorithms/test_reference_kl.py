"""KL to a frozen reference: callbacks.ReferenceModel and the KL term of the coupled (GRPO) loss."""

import lightning as L
import pytest
import torch
from tiny import make_module
from torch import nn

from callbacks import ReferenceModel
from flowrl.algorithms import GRPO
from flowrl.data import PromptDataModule
from flowrl.losses import kl_v_based, kl_x_based

PROMPTS = ["a red circle"] * 2 + ["two squares"] * 2


def make_grpo(path, finetune_type="lora", **kw):
    return make_module(GRPO, path, finetune_type=finetune_type, **{"clip_range": 1e-2, "noise_level": 0.7, **kw})


def attach(module, *callbacks):
    """Give a module a trainer (holding ``callbacks``) without fitting; build the references."""
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=list(callbacks))
    module.trainer = trainer
    for cb in callbacks:
        if isinstance(cb, ReferenceModel):
            cb.build(module)
    return trainer


def fit(module, prompt_file, tmp_path, callbacks, max_steps=2, ckpt_path=None):
    dm = PromptDataModule(prompt_file, group_size=2, batch_size=4)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, use_distributed_sampler=False, callbacks=callbacks,
                        enable_checkpointing=False)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def param_bytes(module):
    return sum(p.numel() * p.element_size() for p in module.parameters())


def perturb_lora(module):
    with torch.no_grad():
        for name, p in module.policy.named_trainable_parameters():
            if "lora_B" in name:  # lora_B starts at 0: the policy equals the reference until it moves
                p.normal_(0, 0.05)


# ---------------------------------------------------------------- the callback on its own


def test_construction_checks_name_the_choices():
    with pytest.raises(ValueError, match="x-based.*v-based"):
        ReferenceModel(kl_beta=0.1, kl_type="kl")
    with pytest.raises(ValueError, match="kl_beta"):
        ReferenceModel(kl_beta=-1.0)
    with pytest.raises(ValueError, match="same_as_model"):
        ReferenceModel(kl_beta=0.1, ref_param_device="not a device")
    assert not ReferenceModel().enabled and ReferenceModel(kl_beta=0.04).enabled


def test_plain_module_copy_swaps_in_and_restores_exactly():
    """Usable without flowrl: a plain module, a frozen copy, bit-exact restore even on errors."""
    module = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    module[1].requires_grad_(False)
    ref = ReferenceModel(kl_beta=1.0)
    ref.build(module)
    assert set(ref.reference_parameters) == {"0.weight", "0.bias"}  # only the trained parameters
    initial = {n: p.detach().clone() for n, p in module.named_parameters()}
    x = torch.randn(5, 3)
    y0 = module(x).detach()
    with torch.no_grad():
        module[0].weight.add_(1.0)
    live = {n: p.detach().clone() for n, p in module.named_parameters()}
    with ref.reference(module):
        assert torch.equal(module(x), y0)
        assert not torch.is_grad_enabled()
        assert torch.equal(module[0].weight, initial["0.weight"])
    assert all(torch.equal(p, live[n]) for n, p in module.named_parameters())
    with pytest.raises(KeyError):
        with ref.reference(module):
            raise KeyError("boom")
    assert all(torch.equal(p, live[n]) for n, p in module.named_parameters())


def test_disabled_reference_builds_nothing():
    module = nn.Linear(3, 3)
    ref = ReferenceModel(kl_beta=0.0)
    ref.build(module)
    assert ref.reference_parameters == {} and not ref.uses_copy
    assert ref.state_dict()["reference"] == {}
    with pytest.raises(RuntimeError, match="kl_beta"):
        with ref.reference(module):
            pass


# ---------------------------------------------------------------- LoRA: the adapter-free model is the reference


def test_lora_reference_makes_no_copy(tiny_sd3_path):
    module = make_grpo(tiny_sd3_path)
    before = param_bytes(module)
    ref = ReferenceModel(kl_beta=0.1, kl_type="v-based", ref_param_device="same_as_model")
    attach(module, ref)
    assert not ref.uses_copy and ref.reference_parameters == {}
    assert ref.state_dict()["reference"] == {}
    assert not any(isinstance(v, torch.Tensor) for v in vars(ref).values())
    assert param_bytes(module) == before
    assert module.kl_reference is ref


def test_lora_reference_is_the_base_model(tiny_sd3_path):
    module = make_grpo(tiny_sd3_path)
    perturb_lora(module)
    ref = ReferenceModel(kl_beta=0.1)
    attach(module, ref)
    rollout = module.rollout(PROMPTS)
    idx = torch.arange(2)
    v_ref = module.reference_velocity(rollout, idx, 0)
    step = rollout.train_steps[0]
    cond = rollout.cond.select(idx)
    x, s = rollout.latents[idx, 0], rollout.sigmas[step].item()
    with torch.no_grad():
        v = module.policy.velocity(x, s, cond, module.guidance_scale)
        with module.policy.adapter_disabled():
            v_base = module.policy.velocity(x, s, cond, module.guidance_scale)
    assert torch.equal(v_ref, v_base) and not torch.allclose(v_ref, v)
    assert all(p.requires_grad for p in module.policy.trainable_parameters())  # adapters back on and trainable


def test_kl_beta_zero_adds_no_term(tiny_sd3_path):
    module = make_grpo(tiny_sd3_path)
    ref = ReferenceModel(kl_beta=0.0, kl_type="x-based")
    attach(module, ref)
    assert module.kl_reference is None and ref.reference_parameters == {}
    rollout = module.rollout(PROMPTS)
    out = module.training_loss(rollout, torch.tensor([1.0, -1.0, 0.5, -0.5]), torch.arange(2), 0)
    assert "kl" not in out


@pytest.mark.parametrize("kl_type", ["x-based", "v-based"])
def test_kl_term_matches_formula_and_has_policy_gradient(tiny_sd3_path, kl_type):
    module = make_grpo(tiny_sd3_path)
    perturb_lora(module)
    ref = ReferenceModel(kl_beta=0.5, kl_type=kl_type)
    attach(module, ref)
    rollout = module.rollout(PROMPTS)
    idx, k = torch.arange(2), 1
    advantages = torch.zeros(4)  # no policy-gradient signal: every gradient below comes from the KL

    v_ref = module.reference_velocity(rollout, idx, k)
    out, v, s, s_next = module.step_forward(rollout, idx, k)
    kl = module.kl_divergence(rollout, idx, k, out, v, v_ref, s, s_next)
    if kl_type == "v-based":
        expected = ((v.detach() - v_ref) ** 2).flatten(1).mean(1)
    else:
        x = rollout.latents[idx, k]
        ref_mean = module.dynamics.step(x, v_ref, s, s_next, prev_sample=rollout.next_latents[idx, k]).mean
        std_dev_t = module.dynamics.std_dev_t(s, s_next)
        expected = ((out.mean.detach() - ref_mean) ** 2).flatten(1).mean(1) / (2 * std_dev_t**2)
        assert torch.allclose(kl, kl_x_based(out.mean, ref_mean, std_dev_t))
    assert torch.allclose(kl.detach(), expected, rtol=1e-5, atol=0) and (kl > 0).all()
    assert kl.requires_grad

    terms = module.training_loss(rollout, advantages, idx, k)
    assert torch.allclose(terms["loss"].detach(), terms["policy_loss"] + 0.5 * terms["kl"], rtol=1e-5)
    assert torch.allclose(terms["kl"], kl.detach().mean(), rtol=1e-5)
    terms["loss"].backward()
    grads = [p.grad for p in module.policy.trainable_parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0


def test_kl_term_with_equal_policy_is_zero(tiny_sd3_path):
    module = make_grpo(tiny_sd3_path)  # fresh LoRA: lora_B = 0, policy == reference
    ref = ReferenceModel(kl_beta=1.0, kl_type="v-based")
    attach(module, ref)
    rollout = module.rollout(PROMPTS)
    idx = torch.arange(2)
    v_ref = module.reference_velocity(rollout, idx, 0)
    out, v, s, s_next = module.step_forward(rollout, idx, 0)
    assert torch.equal(kl_v_based(v, v_ref), torch.zeros(2))


def test_fit_with_kl_logs_train_kl(tiny_sd3_path, prompt_file, tmp_path):
    module = make_grpo(tiny_sd3_path)
    trainer = fit(module, prompt_file, tmp_path, [ReferenceModel(kl_beta=0.1, kl_type="x-based")])
    assert "train/kl" in trainer.logged_metrics and "train/policy_loss" in trainer.logged_metrics


# ---------------------------------------------------------------- full fine-tuning: a frozen copy


def test_full_finetuning_keeps_a_copy_and_the_reference_stays_the_initial_model(tiny_sd3_path, prompt_file, tmp_path):
    module = make_grpo(tiny_sd3_path, finetune_type="full", optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    initial = {n: p.detach().clone() for n, p in module.policy.named_trainable_parameters()}
    x = torch.randn(2, *module.policy.adapter.latent_shape(16, 16))
    cond = module.policy.encode_prompt(["a red circle", "a cat"])
    with torch.no_grad():
        v_initial = module.policy.velocity(x, 0.5, cond, 3.0)

    ref = ReferenceModel(kl_beta=0.5, kl_type="v-based", ref_param_device="cpu")
    fit(module, prompt_file, tmp_path, [ref], max_steps=2)

    copy = ref.reference_parameters
    assert ref.uses_copy and set(copy) == {"policy." + n for n in initial}
    assert all(t.device.type == "cpu" for t in copy.values())
    assert all(torch.equal(copy["policy." + n], t) for n, t in initial.items())
    live = {n: p.detach().clone() for n, p in module.policy.named_trainable_parameters()}
    assert any(not torch.equal(live[n], initial[n]) for n in initial), "training did not move the weights"
    with torch.no_grad():
        with ref.reference(module):
            v_reference = module.policy.velocity(x, 0.5, cond, 3.0)
        v_live = module.policy.velocity(x, 0.5, cond, 3.0)
    assert torch.equal(v_reference, v_initial) and not torch.equal(v_live, v_initial)
    assert all(torch.equal(p, live[n]) for n, p in module.policy.named_trainable_parameters())


def test_ref_param_device_same_as_model(tiny_sd3_path):
    module = make_grpo(tiny_sd3_path, finetune_type="full")
    ref = ReferenceModel(kl_beta=0.5, ref_param_device="same_as_model")
    attach(module, ref)
    params = dict(module.named_parameters())
    assert ref.uses_copy and all(t.device == params[n].device for n, t in ref.reference_parameters.items())


def test_checkpoint_resume_keeps_the_original_reference(tiny_sd3_path, prompt_file, tmp_path):
    module = make_grpo(tiny_sd3_path, finetune_type="full", optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    initial = {"policy." + n: p.detach().clone() for n, p in module.policy.named_trainable_parameters()}
    ref = ReferenceModel(kl_beta=0.5, kl_type="x-based")
    trainer = fit(module, prompt_file, tmp_path, [ref], max_steps=2)
    ckpt = tmp_path / "kl.ckpt"
    trainer.save_checkpoint(ckpt)
    trained = {n: p.detach().clone() for n, p in module.named_parameters() if n in initial}
    assert any(not torch.equal(trained[n], initial[n]) for n in initial)
    state = torch.load(ckpt, weights_only=False)
    saved = next(v for k, v in state["callbacks"].items() if "ReferenceModel" in k)["reference"]
    assert all(torch.equal(saved[n], initial[n]) for n in initial)

    # The resumed run loads the trained weights before fit start; the reference must still be the initial one.
    resumed = make_grpo(tiny_sd3_path, finetune_type="full", optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    ref2 = ReferenceModel(kl_beta=0.5, kl_type="x-based")
    fit(resumed, prompt_file, tmp_path, [ref2], max_steps=3, ckpt_path=ckpt)
    assert resumed.iteration == 2
    copy = ref2.reference_parameters
    assert set(copy) == set(initial) and all(torch.equal(copy[n], initial[n]) for n in initial)
