"""A training iteration's rollout: this iteration's trained steps, per-sample generators, DanceGRPO's shared start
noise, the trainer callbacks' sampling contexts (e.g. the EMA weights), and what the rollout keeps for training."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from callbacks import enter_sampling_contexts
from flowrl.rollout import Rollout

__all__ = ["draw", "keeps_uncond_branch"]


def keeps_uncond_branch(module, guidance_scale: float) -> bool:
    """Whether a rollout keeps the unconditional CFG branch of its trained steps for training to reuse.

    Exact only where training would recompute the very same thing: the branch runs without gradient
    (``uncond_gradient: false``) on the rollout's latents, in the rollout's micro-batches, with the weights that
    sampled (no callback swaps other weights in for sampling, no dropout makes the training pass differ, and the
    update loop drops it at the first optimizer step)."""
    policy = module.policy
    swaps = module.callbacks_of(lambda cb: callable(getattr(cb, "sampling_context", None))
                                and getattr(cb, "off_policy", True))
    return (module.recomputes_rollout_velocities and not policy.uncond_gradient and guidance_scale > 1.0
            and policy.adapter.guidance_mode == "cfg" and not swaps and not policy.has_dropout)


def draw(module, prompts: Sequence[str], group_ids: torch.Tensor | None = None,
         on_chunk: Callable[[slice, torch.Tensor], None] | None = None, conditions: Sequence | None = None) -> Rollout:
    """Samples of ``prompts`` for training at ``module.iteration``. With ``same_initial_noise``, the members of a
    group (same ``group_ids`` entry) start from the same noise (DanceGRPO's shared noise): the rewards within a
    group then differ only through the stochastic (trained) steps."""
    steps = module.step_selector.select(module.iteration)
    gens = module._sample_generators(len(prompts), module.iteration)
    latents = None
    if module.same_initial_noise and group_ids is not None:
        # one start per group, from a generator keyed by the group id (unique in the global batch)
        ids = torch.as_tensor(group_ids).cpu().tolist()
        starts = {gid: module.policy.prepare_latents(1, module.height, module.width,
                                                     module._generator(module.iteration, "group", gid))
                  for gid in set(ids)}
        latents = torch.cat([starts[gid] for gid in ids])
    was_training = module.policy.training
    module.policy.eval()
    try:
        with enter_sampling_contexts(module._trainer, module):
            return module.sampler.sample(prompts, module.height, module.width, module.num_inference_steps,
                                         module.guidance_scale, gens, steps,
                                         "trajectory" if module.stores_trajectory else "final", latents, on_chunk,
                                         store_means=module.stores_means,
                                         store_uncond=keeps_uncond_branch(module, module.guidance_scale),
                                         conditions=conditions)
    finally:
        module.policy.train(was_training)
