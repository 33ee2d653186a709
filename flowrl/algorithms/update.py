"""The update loop of one iteration: micro-batches, gradient accumulation, DDP's no_sync, the guarded optimizer step.

Shared by every algorithm: an algorithm says what its training units are and what the loss of one micro-batch on
one unit is (``training_units``, ``training_loss``); this module turns them into optimizer steps.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import ParallelStrategy
from torch.distributed.tensor import DTensor

from flowrl.rollout import Rollout

__all__ = ["StepGuard", "backward", "micro_batch_plan", "run_updates", "world_size"]

_EPOCH_SALT = 104729  # separates the inner epochs' shuffles from the other draws


def micro_batch_plan(module, n: int, keep: torch.Tensor | None) -> list[tuple[int, torch.Tensor]]:
    """``(inner epoch, sample indices)`` of every micro-batch of the iteration. The first epoch keeps the rollout's
    batching (on-policy log-probs then reproduce exactly); later ones shuffle, seeded by (iteration, epoch).
    Samples outside ``keep`` (dropped groups) are left out."""
    plan = []
    for epoch in range(module.num_inner_epochs):
        gen = module._generator(module.iteration, epoch, _EPOCH_SALT)
        order = torch.arange(n) if epoch == 0 else torch.randperm(n, generator=gen)
        for sl in module.sampler.chunks(n):
            idx = order[sl] if keep is None else order[sl][keep[order[sl]]]
            if len(idx):
                plan.append((epoch, idx))
    return plan


def run_updates(module, rollout: Rollout, advantages: torch.Tensor, keep: torch.Tensor | None) -> dict[str, list]:
    """Every update of one iteration; returns the per-micro-batch loss terms (and grad norms) to log.

    The kept unconditional CFG branch of the rollout (``rollout.v_uncond``) is what recomputing it would give only
    until the first optimizer step: it is dropped there."""
    optimizer, scheduler = module.optimizers(), module.lr_schedulers()
    gas = module.gradient_accumulation_steps
    logs: dict[str, list[torch.Tensor]] = {}
    first_update_ratios: list[torch.Tensor] = []  # before the iteration's first optimizer step
    with module.profile("frozen_velocities"):  # decoupled trainers: the old / EMA / reference velocities
        units = module.training_units(rollout)
    plan = micro_batch_plan(module, len(rollout.prompts), keep)
    guard = StepGuard(module)
    for micro, (epoch, idx) in enumerate(plan):
        # The last micro-batch of an optimizer step: its last backward all-reduces the accumulated gradients
        # (DDP); the others accumulate locally (no_sync).
        steps_now = (micro + 1) % gas == 0 or micro == len(plan) - 1
        for u, unit in enumerate(units):
            with module.profile("train_forward"):
                out = module.training_loss(rollout, advantages, idx, unit)
                guard.check_loss(out["loss"])
            with module.profile("backward"):
                backward(module, out["loss"] / (len(units) * gas), sync=steps_now and u == len(units) - 1)
            for k, v in out.items():
                logs.setdefault(k, []).append(v.detach().float().reshape(-1).cpu())
            if micro < gas and epoch == 0 and "ratio" in out:
                first_update_ratios.append(out["ratio"].detach().double().reshape(-1).cpu())
        if steps_now:
            with module.profile("optimizer"):
                guard.optimizer_step(optimizer, scheduler, logs)
            rollout.v_uncond = None  # the weights changed: the rollout's branch is no longer the model's
    if first_update_ratios:
        # On-policy the first update reproduces the rollout's log-probs: any deviation from 1 is a mismatch
        # between training and rollout (precision, batching), the diagnostic the papers' users watch.
        logs["ratio_first_update_max_abs_dev"] = [(torch.cat(first_update_ratios) - 1.0).abs().max().float()[None]]
    return logs


def world_size(module) -> int:
    """How many processes train ``module`` (1 outside a Trainer)."""
    return module.trainer.world_size if module._trainer is not None else 1


def backward(module, loss: torch.Tensor, sync: bool) -> None:
    """``manual_backward``; without ``sync`` under DDP, no gradient all-reduce (an accumulation micro-step)."""
    strategy = module.trainer.strategy
    if sync or not isinstance(strategy, ParallelStrategy):
        module.manual_backward(loss)
        return
    with strategy.block_backward_sync():
        module.manual_backward(loss)


def sharded_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of gradients some of which are FSDP2 shards (DTensors): the shards' squares summed over the
    processes of their mesh, the whole (replicated) gradients counted once."""
    import torch.distributed as dist

    squares = torch.zeros((), dtype=torch.float64)
    whole = torch.zeros((), dtype=torch.float64)
    group = None
    for g in grads:
        if isinstance(g, DTensor):
            squares += g.to_local().double().pow(2).sum().cpu()
            group = g.device_mesh.get_group()
        else:
            whole += g.double().pow(2).sum().cpu()
    if group is not None and dist.is_initialized():
        device = grads[0].to_local().device if isinstance(grads[0], DTensor) else grads[0].device
        squares = squares.to(device)
        dist.all_reduce(squares, group=group)
        squares = squares.cpu()
    return (squares + whole).sqrt().float()


class StepGuard:
    """No update from a non-finite loss or gradient, on any process."""

    def __init__(self, module):
        self.module, self.bad_loss = module, None

    def check_loss(self, loss: torch.Tensor) -> None:
        """A non-finite loss raises before its backward. With several processes every rank must take part in every
        backward's all-reduce, so the loss is only noted here and every rank raises at the optimizer step."""
        if torch.isfinite(loss):
            return
        message = (f"non-finite loss {loss.item()} at iteration {self.module.iteration}; no update was made. "
                   "Lower the learning rate or check the reward and the inputs.")
        if world_size(self.module) == 1:
            raise FloatingPointError(message)
        self.bad_loss = self.bad_loss or message

    def optimizer_step(self, optimizer, scheduler, logs) -> None:
        module = self.module
        # The norm is measured before clipping, so an explosion shows in train/grad_norm.
        grads = [p.grad for p in module.policy.trainable_parameters() if p.grad is not None]
        sharded = any(isinstance(g, DTensor) for g in grads)
        norm = sharded_grad_norm(grads) if sharded else (
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            if grads else torch.zeros(()))
        bad = self.bad_loss is not None or not bool(torch.isfinite(norm))
        if world_size(module) > 1:  # every rank decides alike (sharded gradients may differ in finiteness)
            bad = module.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            optimizer.zero_grad(set_to_none=True)
            if self.bad_loss is not None:
                raise FloatingPointError(self.bad_loss)
            if world_size(module) > 1 and bool(torch.isfinite(norm)):
                raise FloatingPointError(f"a non-finite loss or gradient on another process at iteration "
                                         f"{module.iteration}; no update was made on any process")
            raise FloatingPointError(f"non-finite gradient at iteration {module.iteration}; no update was made")
        logs.setdefault("grad_norm", []).append(norm.detach().reshape(-1).cpu())
        clipped = bool(module.max_grad_norm) and bool(norm > module.max_grad_norm)
        logs.setdefault("grad_clipped", []).append(torch.tensor([float(clipped)]))
        if module.max_grad_norm and sharded:  # clip_grad_norm_'s rule, on each process's shards
            coefficient = torch.clamp(module.max_grad_norm / (norm + 1e-6), max=1.0)
            for g in grads:
                g.to_local().mul_(coefficient.to(g.dtype))
        elif module.max_grad_norm:
            module.clip_gradients(optimizer, gradient_clip_val=module.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
