"""The rollout sampler: a policy, sampling dynamics and seeded generators in, a :class:`Rollout` out."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch

from flowrl.dynamics import ODE, SDESchedulerMixin
from flowrl.rollout.record import Rollout
from flowrl.rollout.storage import RolloutStorage

__all__ = ["RolloutSampler", "slices"]


def slices(n: int, size: int | None) -> list[slice]:
    """``n`` samples in consecutive slices of ``size`` (None: one slice)."""
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class RolloutSampler:
    """Samples a policy: the trained steps with ``dynamics`` (an SDE gives exploration and a log-prob), every other
    step with the Euler ODE. No Trainer needed::

        sampler = RolloutSampler(policy, FlowSDE(noise_level=0.7))
        rollout = sampler.sample(prompts, 32, 32, 10, 4.5, per_sample_generators(0, len(prompts)),
                                 train_steps=[0, 1], store="trajectory")

    Args:
        policy: a :class:`flowrl.policy.FlowMatchingPolicy`.
        dynamics: the rule of the trained steps (default: the ODE, so every step is deterministic).
        train_batch_size: samples per forward pass of the trained steps; training recomputes their log-probs in
            exactly these batches, so on-policy ratios are exactly 1. None = the whole batch.
        rollout_batch_size: samples per forward pass of the untrained steps; None = ``train_batch_size``.
        profile: ``profile(phase)`` returns a context manager timing that phase (e.g. the Trainer's profiler).
        storage: the dtype of the stored latents and whether stored tensors go to host memory
            (:class:`flowrl.rollout.storage.RolloutStorage`); None = float32 on the device.
    """

    def __init__(self, policy, dynamics: SDESchedulerMixin | None = None, train_batch_size: int | None = None,
                 rollout_batch_size: int | None = None, profile: Callable[[str], AbstractContextManager] | None = None,
                 storage: RolloutStorage | None = None):
        self.policy = policy
        self.dynamics = dynamics if dynamics is not None else ODE()
        self.ode = ODE()
        self.train_batch_size, self.rollout_batch_size = train_batch_size, rollout_batch_size
        self.profile = profile or (lambda phase: contextlib.nullcontext())
        self.storage = storage or RolloutStorage()

    def chunks(self, n: int) -> list[slice]:
        """The micro-batches of the trained steps (and of training): ``train_batch_size`` samples each."""
        return slices(n, self.train_batch_size)

    def rollout_chunks(self, n: int) -> list[slice]:
        """The batches of the untrained steps: ``rollout_batch_size`` samples, else the micro-batches."""
        return self.chunks(n) if self.rollout_batch_size is None else slices(n, self.rollout_batch_size)

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        generator: torch.Generator | Sequence[torch.Generator],
        train_steps: Sequence[int] = (),
        store: str = "final",
        latents: torch.Tensor | None = None,
        on_chunk: Callable[[slice, torch.Tensor], None] | None = None,
        store_means: bool = False,
        store_uncond: bool = False,
        conditions: Sequence | None = None,
    ) -> Rollout:
        """Sample ``prompts``; steps in ``train_steps`` use the dynamics, the rest the ODE.

        ``store='trajectory'`` keeps the latents, samples and log-probs of the trained steps (``store_means``: their
        means too; ``store_uncond``: their unconditional CFG branch, for training to reuse), as :attr:`storage`
        says (a low-precision storage rounds the trained steps' inputs and samples as they are made). The trained
        steps go in chunks of ``train_batch_size``, the others in chunks of ``rollout_batch_size``.
        ``on_chunk(slice, images)`` is called as each chunk's images are decoded. ``generator``: one for the batch,
        or one per sample (each sample's starting noise, then its step noise, from its own). ``latents``: the
        starting noise, if given.
        ``conditions``: each sample's :class:`flowrl.conditions.ConditionImages` (editing, image-to-video), or None.
        """
        policy = self.policy
        n = len(prompts)
        with self.profile("encode_prompt"):
            cond = policy.encode_prompt(prompts, conditions, height, width)
        sigmas = policy.sigmas(num_inference_steps, height, width)
        x, noise = self._noise(n, height, width, num_inference_steps, generator, latents)
        trained = sorted(train_steps)
        keep = store == "trajectory" and bool(trained)
        record = {i: [] for i in trained} if keep else {}  # trained step -> its chunks' tensors, in sample order
        steps = (cond, sigmas, noise, guidance_scale, trained, record, keep and store_uncond)
        finals, images = [], []
        train_chunks, wide_chunks = self.chunks(n), self.rollout_chunks(n)
        if wide_chunks == train_chunks:
            # Micro-batch by micro-batch (the same batches, noise and arithmetic as step by step over all of
            # them), so that a finished micro-batch can be scored (``on_chunk``) while the next one samples.
            for sl in train_chunks:
                with self.profile("sampling_steps"):
                    finals.append(self._steps(x, range(num_inference_steps), [sl], *steps))
                with self.profile("decode"):
                    images.append(policy.decode(finals[-1], cond.select(sl)))
                if on_chunk is not None:
                    on_chunk(sl, images[-1])
        else:
            # Step by step over the batch: the trained steps in the micro-batches training recomputes them in
            # (exact log-probs), every other step in chunks of rollout_batch_size.
            with self.profile("sampling_steps"):
                for is_trained, run in itertools.groupby(range(num_inference_steps), key=lambda i: i in trained):
                    x = self._steps(x, list(run), train_chunks if is_trained else wide_chunks, *steps)
            finals = [x]
            with self.profile("decode"):
                images = [policy.decode(x[sl], cond.select(sl)) for sl in wide_chunks]
        # each stored field, (B, K, ...): a trained step's chunks in sample order, the K trained steps stacked
        fields = {"latents": 0, "next_latents": 1, "log_probs": 2, "means": 3, "v_uncond": 4} if keep else {}
        if not store_means:
            fields.pop("means", None)
        if not store_uncond:
            fields.pop("v_uncond", None)
        if keep and not self.dynamics.is_stochastic:  # an ODE trajectory (distillation) has no log-probs
            fields.pop("log_probs")
        store, device = self.storage, policy.device
        parts = {name: store.wrap(torch.stack([torch.cat([entry[f] for entry in record[i]]) for i in trained], 1),
                                  device) for name, f in fields.items()}
        final = store.wrap(store.keep(torch.cat(finals), latent=False), device)
        return Rollout(list(prompts), cond, sigmas, trained, parts.get("latents"), parts.get("next_latents"),
                       parts.get("log_probs"), parts.get("means"), final, torch.cat(images),
                       v_uncond=parts.get("v_uncond"))

    def _noise(self, n, height, width, num_inference_steps, generator, latents):
        """The starting latents and every step's noise ``(steps, B, ...)``."""
        policy = self.policy
        if isinstance(generator, torch.Generator):
            x = policy.prepare_latents(n, height, width, generator) if latents is None else latents.to(policy.device)
            return x, torch.randn((num_inference_steps, *x.shape), generator=generator).to(x.device)
        if len(generator) != n:
            raise ValueError(f"{len(generator)} generators for {n} samples")
        starts, noise = [], []
        for g in generator:  # the start is drawn even when ``latents`` are given: the step noise stays the same
            starts.append(policy.prepare_latents(1, height, width, g))
            noise.append(torch.randn((num_inference_steps, *starts[-1].shape), generator=g))
        x = torch.cat(starts) if latents is None else latents.to(policy.device)
        return x, torch.cat(noise, dim=1).to(x.device)

    def _steps(self, x, steps, chunks, cond, sigmas, noise, guidance_scale, trained, record, keep_uncond):
        """Steps ``steps`` of the samples in ``chunks`` (of the whole batch ``x``): their latents after them.
        The trained steps record their inputs, samples, log-probs, means and unconditional branch. Where the
        storage is in a lower precision, a recorded step's input is rounded before the denoiser sees it and its
        sample before it is scored: the stored values are the ones computed with, so training repeats them."""
        policy, store, outs = self.policy, self.storage, []
        for sl in chunks:
            xc, chunk_cond = x[sl], cond.select(sl)
            for i in steps:
                dyn = self.dynamics if i in trained else self.ode
                s, s_next = sigmas[i].item(), sigmas[i + 1].item()
                recorded = i in record
                if recorded:
                    xc = store.round(xc)
                with policy.denoising_step(trained=recorded):  # compiled or not (policy.compile)
                    v_u = (policy.unconditional_velocity(xc, s, cond=chunk_cond) if keep_uncond and i in trained
                           else None)
                    v = policy.velocity(xc, s, chunk_cond, guidance_scale, uncond_velocity=v_u)
                out = dyn.step(xc, v, s, s_next, noise=noise[i, sl])
                if recorded:
                    sample = store.round(out.prev_sample)
                    if sample is not out.prev_sample:  # the log-prob of the sample as stored (training rescores it)
                        out = dyn.step(xc, v, s, s_next, prev_sample=sample)
                    record[i].append((store.keep(xc, latent=True), store.keep(out.prev_sample, latent=True),
                                      store.keep(out.log_prob, latent=False), store.keep(out.mean, latent=False),
                                      store.keep(v_u, latent=False)))
                xc = out.prev_sample
            outs.append(xc)
        return torch.cat(outs)
