"""Tiny-module factories shared by the algorithm tests (a tiny random SD3 from ``tiny_sd3_path``)."""

import lightning as L
import torch

from flowrl.data import PromptDataModule
from flowrl.policy import PolicyConfig
from flowrl.rewards import RewardSpec


def seed_options(**options) -> dict:
    """Constructor arguments from options in the seed's flat names (``dynamics_type``, ``noise_level``,
    ``train_steps`` ...), translated by flowrl's alias table into components, as ``flowrl fit`` does for configs."""
    from flowrl.fit import translate_config
    from flowrl.imports import import_class_path

    init = translate_config({"model": options})["model"]
    for name in ("dynamics", "step_selection"):
        if isinstance(init.get(name), dict):
            init[name] = import_class_path(init[name]["class_path"])(**init[name].get("init_args", {}))
    return init


def make_module(cls, path, *, finetune_type="lora", lora_rank=4, **overrides):
    """An algorithm ``cls`` on the tiny pipeline at ``path``: 16 px, 4 steps, groups of 2, micro-batches of 2
    (options may use the seed's flat names, see :func:`seed_options`)."""
    args = dict(
        policy=PolicyConfig(path, finetune_type=finetune_type, lora_rank=lora_rank),
        rewards=[RewardSpec("jpeg_incompressibility")],
        group_size=2,
        resolution=16,
        num_inference_steps=4,
        guidance_scale=3.0,
        train_batch_size=2,
    )
    args.update(seed_options(**overrides))
    return cls(**args)


def fit_one_iteration(module, prompt_file, **trainer_kw):
    """``Trainer.fit`` of ``module`` on ``prompt_file`` (groups of 2, batches of 4) until its first optimizer step;
    with ``max_epochs=1, limit_train_batches=1`` also when the iteration makes no update."""
    dm = PromptDataModule(prompt_file, group_size=2, batch_size=4)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, use_distributed_sampler=False, **trainer_kw)
    trainer.fit(module, datamodule=dm)
    return trainer


def randomize_lora(module, std=0.05):
    """A non-zero LoRA, so that the live model differs from the base model."""
    with torch.no_grad():
        for p in module.policy.trainable_parameters():
            p.normal_(0, std)


def checkpointing_gradients(path, finetune_type, guidance_scale, prompts=("a red circle", "two blue squares"),
                            size=16, conditions=None, **policy_kwargs):
    """The gradients of one velocity loss without and with gradient checkpointing, and how many checkpointed
    block calls the second pass made: ``(grads_off, grads_on, calls)`` (a family test compares them).
    ``conditions``: the prompts' condition images (image-conditioned families)."""
    from flowrl.policy import FlowMatchingPolicy

    grads, calls = [], []
    for checkpointing in (False, True):
        policy = FlowMatchingPolicy.from_pretrained(path, finetune_type=finetune_type, lora_rank=2,
                                                    gradient_checkpointing=checkpointing, **policy_kwargs).train()
        if finetune_type == "lora":
            torch.manual_seed(0)
            randomize_lora_policy(policy)
        transformer = policy.transformer
        assert transformer.gradient_checkpointing == checkpointing
        if checkpointing:
            original = transformer._gradient_checkpointing_func
            transformer._gradient_checkpointing_func = lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k)
        cond = policy.encode_prompt(list(prompts), conditions, size, size)
        x = policy.prepare_latents(len(prompts), size, size, torch.Generator().manual_seed(0))
        policy.velocity(x, torch.tensor([0.8, 0.3]), cond, guidance_scale).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_trainable_parameters() if p.grad is not None})
    return grads[0], grads[1], len(calls)


def assert_same_gradients(off, on):
    assert off.keys() == on.keys() and off
    for n in off:
        torch.testing.assert_close(on[n], off[n], rtol=1e-5, atol=1e-7, msg=n)


def randomize_lora_policy(policy, std=0.05):
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.normal_(0, std)


def assert_on_policy_ratios_are_one(module, rollout, advantages):
    """The training pass recomputes every rollout log-prob bit for bit: every ratio of every micro-batch and
    trained step is exactly 1 before any update."""
    n = len(rollout.prompts)
    for sl in module.sampler.chunks(n):
        idx = torch.arange(n)[sl]
        for k in module.training_units(rollout):
            out = module.training_loss(rollout, advantages, idx, k)
            assert torch.equal(out["ratio"], torch.ones_like(out["ratio"])), out["ratio"]


def save_teacher_checkpoint(module, path, std=0.05, seed=0) -> str:
    """A checkpoint as ``flowrl fit`` writes it (the trained parameters under ``state_dict``) of ``module`` with a
    random non-zero LoRA: a DiffusionOPD teacher unlike the base model. ``module`` is left randomized."""
    torch.manual_seed(seed)
    randomize_lora(module, std)
    state = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    torch.save({"state_dict": state}, path)
    return str(path)
