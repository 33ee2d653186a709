"""What every flowrl algorithm shares: the policy, rewards, rollouts, validation and the update loop.

An algorithm subclass says what a rollout must store (``stores_trajectory``), which sampling
dynamics are allowed (``needs_log_prob``) and how to turn stored data into a loss
(``training_loss``). The Lightning ``Trainer`` owns devices, precision, strategies and checkpoints.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics.aggregation import MeanMetric

from callbacks import ReferenceModel, enter_sampling_contexts
from flowrl.advantages import ADVANTAGE_AGGREGATIONS, gdpo_advantages, group_advantages
from flowrl.checkpoint import use_atomic_checkpoints
from flowrl.dynamics import build_dynamics
from flowrl.dynamics.selection import StepSelector
from flowrl.errors import ConfigError
from flowrl.policy import Conditioning, FlowMatchingPolicy, PolicyConfig
from flowrl.rewards import RewardError, RewardSpec, WeightedReward
from flowrl.rewards.scoring import AsyncScorer
from flowrl.rollout import Rollout, RolloutSampler, keyed_generator, per_sample_generators
from flowrl.validation import check_number, check_range_option

#: upper bound of noise_level per stochastic dynamics: (bound, exclusive, why). Flow-SDE and Dance-SDE at the
#: first step from sigma 1 (and Dance-SDE at the last) scale x by 1 - a**2 / 2: a < sqrt(2) keeps it positive;
#: CPS's std = sigma_next * sin(a pi / 2) peaks at a = 1. The actual schedule is checked once the model loads.
NOISE_LEVEL_LIMITS = {
    "Flow-SDE": (math.sqrt(2.0), True, " (above sqrt(2) the first step's mean flips the sign of x)"),
    "Dance-SDE": (math.sqrt(2.0), True, " (above sqrt(2) the last step's mean flips the sign of x)"),
    "CPS": (1.0, False, " (std = sigma_next * sin(noise_level * pi / 2))"),
    "ODE": (math.inf, False, ""),
}

OptimizerCallable = Callable[[Iterable], torch.optim.Optimizer]
LRSchedulerCallable = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def _hw(resolution: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(resolution, int):
        return resolution, resolution
    if len(resolution) != 2:
        raise ConfigError(f"resolution must be an int or [height, width], got {resolution!r}")
    return int(resolution[0]), int(resolution[1])


@dataclass
class EvalConfig:
    """Validation sampling (always ODE). ``None`` fields fall back to the training values.

    The seed's train/eval decoupling: train at a small ``resolution``, evaluate at full size.

    Args:
        resolution: validation image size, an int or [height, width]; null = the training resolution.
        num_inference_steps: validation sampling steps; null = the training value.
        guidance_scale: validation guidance; null = the training value.
        seed: seed of the validation noise (the same images every validation).
    """

    resolution: int | list[int] | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0


#: what a failing reward (raises, non-finite or wrong-length scores) does: ``stop`` raises before any update of
#: the iteration; ``skip_group`` drops the groups it affects from the iteration (logged), a failure of the whole
#: batch skips the iteration.
ON_REWARD_ERROR = ("stop", "skip_group")


class FlowRLModule(L.LightningModule):
    """Base class; use a concrete algorithm (``GRPO``, ...).

    Args:
        policy: the pretrained pipeline and which of its parameters train.
        rewards: reward terms: ``{name: <registered>, args: {...}}`` or ``{class_path: ..., init_args: {...}}``,
            each with a ``weight`` and a log ``label`` (null = jpeg_compressibility).
        group_size: samples per prompt; advantages are normalised within each group.
        resolution: image size of rollouts, an int or [height, width].
        num_inference_steps: sampling steps of a rollout (and of validation unless ``eval`` sets its own).
        guidance_scale: classifier-free guidance of rollouts (FLUX dev: its distilled guidance; 1 = none).
        eval: validation sampling (always ODE): resolution, num_inference_steps, guidance_scale, seed;
            null fields take the training values.
        dynamics_type: sampler of the trained steps: Flow-SDE, Dance-SDE, CPS, or ODE (decoupled trainers).
        noise_level: the SDE's noise scale (Flow-SDE and Dance-SDE below sqrt(2), CPS at most 1); null = the
            dynamics' default (0.7, Dance-SDE 0.3).
        train_steps: the sampling steps that may be trained, indices in [0, num_inference_steps - 2]; null = all.
        num_train_steps: how many of them to train per iteration, drawn at random; null = all.
        window_size: MixGRPO's sliding window of trained steps, moving from high to low noise; null = no window.
        window_shift_interval: iterations between two moves of the window (needed with window_size).
        window_stride: steps the window moves by (null = 1).
        num_inner_epochs: passes of updates over each iteration's rollouts.
        train_batch_size: samples per micro-batch, of the rollout's forward passes and of the updates alike;
            null = the whole batch.
        rollout_batch_size: samples per forward pass of the rollout's untrained steps (the trained ones keep
            train_batch_size, so log-probs stay exact), as many as memory allows; null = train_batch_size.
        gradient_accumulation_steps: micro-batches per optimizer step.
        max_grad_norm: clip the gradient norm to this before each optimizer step; null = no clipping.
        clip_range: PPO clip of the probability ratio, c or [low, high] (trainers with a ratio only).
        adv_clip_range: clamp the advantages to [-c, c] or [low, high]; null = no clamp.
        global_std: divide advantages by the std of the whole batch (every process) instead of the group's.
        advantage_aggregation: several rewards: ``sum`` (normalise their weighted sum per group) or ``gdpo``
            (normalise each reward per group, then their weighted sum over the batch).
        on_reward_error: a reward that raises or returns NaN / the wrong count: ``stop`` (raise before any
            update) or ``skip_group`` (drop the affected groups from the iteration, logged).
        async_rewards: score each sampled micro-batch in a background thread while the next one samples
            (pointwise rewards only).
        same_initial_noise: every member of a group starts from the same noise (DanceGRPO).
        optimizer: optimizer of the trained parameters, ``class_path`` + ``init_args`` (AdamW by default).
        lr_scheduler: learning-rate scheduler, stepped after every optimizer step; null = constant.
        seed: seed of rollout noise and trained-step draws (the same on every process).
    """

    #: coupled algorithms need a tractable log-prob at trained steps, so they forbid ODE dynamics.
    needs_log_prob: bool = True
    #: store per-step latents / log-probs (coupled) or only the final latents (decoupled).
    stores_trajectory: bool = True
    #: also store step means (GRPO-Guard).
    stores_means: bool = False
    trainer_type: str = ""
    #: options inherited from the base signature that this trainer has no use for: set, they are refused.
    unused_options: tuple[str, ...] = ()

    def __init__(
        self,
        policy: PolicyConfig,
        rewards: list[RewardSpec | dict[str, Any]] | None = None,
        group_size: int = 8,
        resolution: int | list[int] = 512,
        num_inference_steps: int = 10,
        guidance_scale: float = 4.5,
        eval: EvalConfig | None = None,
        dynamics_type: str = "Flow-SDE",
        noise_level: float | None = None,
        train_steps: list[int] | None = None,
        num_train_steps: int | None = None,
        window_size: int | None = None,
        window_shift_interval: int | None = None,
        window_stride: int | None = None,
        num_inner_epochs: int = 1,
        train_batch_size: int | None = None,
        rollout_batch_size: int | None = None,
        gradient_accumulation_steps: int = 1,
        max_grad_norm: float | None = 1.0,
        clip_range: float | list[float] | None = None,
        adv_clip_range: float | list[float] | None = 5.0,
        global_std: bool = False,
        advantage_aggregation: str = "sum",
        on_reward_error: str = "stop",
        async_rewards: bool = False,
        same_initial_noise: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self._save_plain_hyperparameters(policy, rewards)
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the trained parameters
        self.eval_config = EvalConfig(**eval) if isinstance(eval, dict) else (eval or EvalConfig())
        self.group_size = group_size
        self.height, self.width = _hw(resolution)
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        self.num_inner_epochs, self.train_batch_size = num_inner_epochs, train_batch_size
        self.gradient_accumulation_steps, self.max_grad_norm = gradient_accumulation_steps, max_grad_norm
        self.clip_range, self.adv_clip_range, self.global_std = clip_range, adv_clip_range, global_std
        self.same_initial_noise = same_initial_noise
        self.advantage_aggregation, self.on_reward_error = advantage_aggregation, on_reward_error
        self.async_rewards = async_rewards
        check_number("rollout_batch_size", rollout_batch_size, 1, allow_none=True, hint="; null = train_batch_size")
        self.rollout_batch_size = rollout_batch_size
        if async_rewards and rollout_batch_size is not None:
            raise ConfigError("async_rewards scores each micro-batch as it finishes sampling, and rollout_batch_size "
                              "samples the whole batch step by step (no micro-batch finishes early); set one of "
                              "them: rollout_batch_size: null or async_rewards: false")
        for option, value, choices in (("advantage_aggregation", advantage_aggregation, ADVANTAGE_AGGREGATIONS),
                                       ("on_reward_error", on_reward_error, ON_REWARD_ERROR)):
            if value not in choices:
                raise ConfigError(f"model.{option} must be one of {', '.join(choices)}; got {value!r}")
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.seed = seed
        self._validate_numbers(group_size, num_inner_epochs, gradient_accumulation_steps, train_batch_size, resolution,
                               num_inference_steps, guidance_scale, max_grad_norm, clip_range, adv_clip_range,
                               dynamics_type, noise_level)

        # Configuration errors surface here, before any weights load.
        self.dynamics = build_dynamics(dynamics_type, noise_level)
        self.check_dynamics(dynamics_type)
        self.step_selector = StepSelector(num_inference_steps, train_steps, num_train_steps, seed, window_size,
                                          window_shift_interval, 1 if window_stride is None else window_stride)
        # One WeightedReward in every case (a plain callable is its one term): its checks guard every reward.
        self.reward_fn = rewards if isinstance(rewards, WeightedReward) else WeightedReward.from_specs(
            [rewards] if callable(rewards) else rewards or [RewardSpec("jpeg_compressibility")]
        )
        if async_rewards:
            groupwise = [k for k, r in self.reward_fn.rewards.items() if getattr(r, "groupwise", False)]
            if groupwise:
                raise ConfigError(f"async_rewards scores each micro-batch as it is sampled; the groupwise reward(s) "
                                  f"{groupwise} need whole groups: set async_rewards: false")
        if isinstance(policy, dict):
            policy = PolicyConfig(**policy)
        self.policy = policy if isinstance(policy, FlowMatchingPolicy) else FlowMatchingPolicy.from_config(policy)
        self.policy.check_resolution(self.height, self.width)
        self.sampler = RolloutSampler(self.policy, self.dynamics, train_batch_size, rollout_batch_size, self.profile)
        self._check_schedule()
        self.check_guidance(guidance_scale, self.eval_config.guidance_scale)
        eval_h, eval_w = _hw(self.eval_config.resolution or [self.height, self.width])
        self.policy.check_resolution(eval_h, eval_w)
        self.val_metrics = nn.ModuleDict({"reward": MeanMetric()})
        for name, reward in getattr(self.reward_fn, "rewards", {}).items():
            for category in getattr(reward, "categories", ()):
                self.val_metrics[f"{name}_acc_{category}"] = MeanMetric()
        self.iteration = 0
        self._bad_loss: str | None = None  # a non-finite loss noted this iteration (several processes)
        self.weights_as_sampled = False  # training_step: no optimizer step since the rollout yet

    def _save_plain_hyperparameters(self, policy, rewards) -> None:
        """Hyper-parameters as plain data (checkpoints then load with ``weights_only=True``)."""
        ignore = ["optimizer", "lr_scheduler"]
        ignore += ["policy"] if isinstance(policy, FlowMatchingPolicy) else []
        ignore += ["rewards"] if callable(rewards) else []
        self.save_hyperparameters(ignore=ignore, logger=False)
        plain = lambda v: asdict(v) if is_dataclass(v) else [plain(x) for x in v] if isinstance(v, list) else v  # noqa: E731
        for key in list(self.hparams):
            self.hparams[key] = plain(self.hparams[key])

    def check_dynamics(self, dynamics_type: str) -> None:
        """Refuse sampling dynamics this algorithm cannot train with (called in ``__init__``, before loading)."""
        if self.needs_log_prob and not self.dynamics.is_stochastic:
            raise ConfigError(
                f"trainer_type {self.trainer_type!r} needs a tractable log-prob, which dynamics_type {dynamics_type!r} "
                "does not give; use Flow-SDE, Dance-SDE or CPS, or a decoupled trainer (nft, awm) for ODE sampling"
            )
        if self.needs_log_prob and self.dynamics.noise_level <= 0:
            raise ConfigError(
                f"trainer_type {self.trainer_type!r} with dynamics_type {dynamics_type!r} at noise_level "
                f"{self.dynamics.noise_level}: every trained step then has std 0, a constant log-prob and a zero "
                "policy gradient (the run would learn nothing); set noise_level > 0 (e.g. 0.7)"
            )

    def _validate_numbers(self, group_size, num_inner_epochs, accumulation, train_batch_size, resolution,
                          num_inference_steps, guidance_scale, max_grad_norm, clip_range, adv_clip_range,
                          dynamics_type, noise_level) -> None:
        check_number("group_size", group_size, 2, hint=" (group-relative advantages need group_size >= 2)")
        check_number("num_inner_epochs", num_inner_epochs, 1)
        check_number("gradient_accumulation_steps", accumulation, 1)
        check_number("train_batch_size", train_batch_size, 1, allow_none=True, hint="; null = the whole batch")
        for h_or_w in _hw(resolution):
            check_number("resolution", h_or_w, 1)
        check_number("num_inference_steps", num_inference_steps, 2, hint=" (the last step is never trained)")
        check_number("guidance_scale", guidance_scale, 1.0, hint=" (1 = no classifier-free guidance)")
        check_number("max_grad_norm", max_grad_norm, 0, low_open=True, allow_none=True,
                     hint="; null disables gradient clipping")
        check_range_option("clip_range", clip_range, what="; null disables clipping")
        check_range_option("adv_clip_range", adv_clip_range, what="; null disables clamping")
        limit = NOISE_LEVEL_LIMITS.get(dynamics_type)
        if noise_level is not None and limit is not None:
            check_number(f"noise_level (dynamics_type {dynamics_type})", noise_level, 0, limit[0],
                         high_open=limit[1], hint=limit[2])
        cfg = self.eval_config
        if cfg.resolution is not None:
            for h_or_w in _hw(cfg.resolution):
                check_number("eval.resolution", h_or_w, 1)
        check_number("eval.num_inference_steps", cfg.num_inference_steps, 1, allow_none=True)
        check_number("eval.guidance_scale", cfg.guidance_scale, 1.0, allow_none=True,
                     hint=" (1 = no classifier-free guidance)")

    def check_guidance(self, *scales: float | None) -> None:
        """Guidance scales the model family cannot use (e.g. any but 1 on FLUX.1-schnell) fail at construction."""
        check = getattr(self.policy.adapter, "check_guidance", None)
        for scale in scales:
            if check is not None and scale is not None:
                check(scale)

    def _check_schedule(self) -> None:
        """The sampler's schedule is known once the policy is loaded: every step the SDE may take must keep
        a positive coefficient on ``x`` in its mean (else a large noise level flips the sample's sign)."""
        if not self.dynamics.is_stochastic:
            return
        sigmas = self.policy.sigmas(self.num_inference_steps, self.height, self.width).float().cpu()
        x, zero = torch.ones(1, 1), torch.zeros(1, 1)
        for i in self.step_selector.train_steps:
            s, s_next = sigmas[i].item(), sigmas[i + 1].item()
            out = self.dynamics.step(x, zero, s, s_next, noise=zero)
            if not (torch.isfinite(out.mean).all() and torch.isfinite(out.std).all() and out.mean.item() > 0):
                raise ConfigError(
                    f"noise_level={self.dynamics.noise_level} is too large for dynamics_type {self.dynamics.name!r} "
                    f"on this schedule: step {i} (sigma {s:.4f} -> {s_next:.4f}) gets a mean coefficient on x of "
                    f"{out.mean.item():.3f} (it must stay > 0); lower noise_level or use more sampling steps"
                )

    # ------------------------------------------------------------------ Lightning plumbing
    def configure_optimizers(self):
        params = list(self.policy.trainable_parameters())
        if not params:
            raise ConfigError("the policy has no trainable parameters; check finetune_type / target_modules")
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    def on_fit_start(self):
        datamodule = getattr(self.trainer, "datamodule", None)
        data_group = getattr(datamodule, "group_size", None)
        if data_group is not None and data_group != self.group_size:
            raise ConfigError(f"model.group_size={self.group_size} but data.group_size={data_group}; set them equal")
        self._check_kl_reference()
        use_atomic_checkpoints(self.trainer)  # a run killed while saving keeps its last checkpoint readable

    def on_save_checkpoint(self, checkpoint):
        trained = {n for n, _ in self.named_parameters() if _.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}
        checkpoint["flowrl_iteration"] = self.iteration

    def on_load_checkpoint(self, checkpoint):
        trained = {n for n, p in self.named_parameters() if p.requires_grad}
        missing = sorted(trained - set(checkpoint["state_dict"]))
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} trained parameters (e.g. {missing[:3]}); "
                           "it was written for a different finetune_type / LoRA setup")
        self.iteration = checkpoint.get("flowrl_iteration", 0)

    # ------------------------------------------------------------------ KL reference
    def reference_context(self):
        """The cheap reference model, for :class:`callbacks.ReferenceModel`: with LoRA, the policy with its
        adapters disabled (the base model, no copy); with full fine-tuning None (the callback keeps a copy)."""
        return self.policy.adapter_disabled() if self.policy.finetune_type == "lora" else None

    @property
    def kl_reference(self) -> ReferenceModel | None:
        """The trainer's :class:`callbacks.ReferenceModel` when it asks for a KL term (``kl_beta > 0``), else None."""
        found = [cb for cb in (getattr(self._trainer, "callbacks", None) or []) if isinstance(cb, ReferenceModel)]
        if len(found) > 1:
            raise RuntimeError(f"found {len(found)} ReferenceModel callbacks; keep one in trainer.callbacks")
        return found[0] if found and found[0].enabled else None

    def _check_kl_reference(self) -> None:
        ref = self.kl_reference
        if ref is not None and ref.kl_type == "x-based" and not self.dynamics.is_stochastic:
            raise ConfigError(
                f"kl_type 'x-based' compares the SDE step means, which dynamics_type {self.dynamics.name!r} "
                "does not have; use kl_type: v-based or stochastic dynamics"
            )

    def profile(self, phase: str):
        """A phase of the iteration under the Trainer's profiler, as ``[flowrl] <phase>``: with
        ``--trainer.profiler=simple`` the report splits each iteration into prompt encoding, sampling steps,
        decoding, reward, frozen velocities, training forwards, backwards, optimizer and logging
        (``benchmarks/overhead.py`` reads the same records)."""
        profiler = getattr(self._trainer, "profiler", None)
        return profiler.profile(f"[flowrl] {phase}") if profiler is not None else contextlib.nullcontext()

    def _generator(self, *salt) -> torch.Generator:
        return keyed_generator(self.seed, *salt)

    def _sample_generators(self, n: int, *salt) -> list[torch.Generator]:
        """One generator per sample of this process's batch of ``n``, keyed by the sample's index in the global
        batch (``global_rank * n + j``): the draws do not depend on how many processes share the batch, nor on
        the micro-batching."""
        return per_sample_generators(self.seed, n, *salt, first=self.global_rank * n)

    #: the algorithm recomputes the rollout's guided velocities at the trained steps (coupled trainers), so the
    #: unconditional branch there can be kept from the rollout (:meth:`stores_uncond_velocity`)
    recomputes_rollout_velocities: bool = False

    def stores_uncond_velocity(self, guidance_scale: float) -> bool:
        """Whether a rollout keeps the unconditional CFG branch of its trained steps for training to reuse.

        Exact only where training would recompute the very same thing: the branch runs without gradient
        (``uncond_gradient: false``) on the rollout's latents, in the rollout's micro-batches, with the
        weights that sampled (no callback swaps other weights in for sampling, and no dropout makes the
        training pass differ). :attr:`weights_as_sampled` says, during training, whether no optimizer step has
        been made since the rollout."""
        policy = self.policy
        return (self.recomputes_rollout_velocities and not policy.uncond_gradient and guidance_scale > 1.0
                and policy.adapter.guidance_mode == "cfg" and not self._sampling_swaps_weights()
                and not policy.has_dropout)

    def _sampling_swaps_weights(self) -> bool:
        for cb in getattr(self._trainer, "callbacks", None) or []:
            if callable(getattr(cb, "sampling_context", None)) and getattr(cb, "off_policy", True):
                return True
        return False

    def rollout(self, prompts: Sequence[str], group_ids: torch.Tensor | None = None,
                on_chunk: Callable[[slice, torch.Tensor], None] | None = None) -> Rollout:
        """Samples of ``prompts`` for training. With ``same_initial_noise``, the members of a group (same
        ``group_ids`` entry) start from the same noise (DanceGRPO's shared noise): the rewards within a
        group then differ only through the stochastic (trained) steps, so the group advantage credits
        those actions instead of the luck of the starting point."""
        steps = self.step_selector.select(self.iteration)
        gens = self._sample_generators(len(prompts), self.iteration)
        latents = None
        if self.same_initial_noise and group_ids is not None:
            # one start per group, from a generator keyed by the group id (unique in the global batch)
            ids = torch.as_tensor(group_ids).cpu().tolist()
            starts = {gid: self.policy.prepare_latents(1, self.height, self.width,
                                                       self._generator(self.iteration, "group", gid)) for gid in set(ids)}
            latents = torch.cat([starts[gid] for gid in ids])
        was_training = self.policy.training
        self.policy.eval()
        try:
            with enter_sampling_contexts(self._trainer, self):
                return self.sampler.sample(prompts, self.height, self.width, self.num_inference_steps,
                                           self.guidance_scale, gens, steps,
                                           "trajectory" if self.stores_trajectory else "final", latents, on_chunk,
                                           store_means=self.stores_means,
                                           store_uncond=self.stores_uncond_velocity(self.guidance_scale))
        finally:
            self.policy.train(was_training)

    # ------------------------------------------------------------------ rewards / advantages
    def compute_advantages(self, rewards: torch.Tensor, group_ids: torch.Tensor,
                           keep: torch.Tensor | None = None) -> torch.Tensor:
        """Group-normalised advantages of the weighted reward (``advantage_aggregation: sum``) or of each
        reward term (``gdpo``); with several processes the groups are gathered first. Samples outside ``keep``
        (dropped groups) get advantage 0 and take no part in the statistics."""
        if self.advantage_aggregation == "gdpo":
            names = list(self.reward_fn.last_terms)
            terms = torch.stack([self.reward_fn.last_terms[k] for k in names]).float()
            weights = torch.tensor([self.reward_fn.weights[k] for k in names], dtype=torch.float32)
        else:
            terms, weights = rewards.float()[None], torch.ones(1)
        n = rewards.shape[0]
        if self._trainer is not None and self.trainer.world_size > 1:
            terms = torch.stack([self.all_gather(t.to(self.device)).flatten().cpu() for t in terms])
            group_ids = self.all_gather(group_ids.to(self.device)).flatten().cpu()
        mask = torch.ones(terms.shape[1], dtype=torch.bool) if keep is None else keep
        adv = torch.zeros(terms.shape[1])
        if self.advantage_aggregation == "gdpo":
            adv[mask] = gdpo_advantages(terms[:, mask], weights, group_ids[mask], global_std=self.global_std)
        else:
            adv[mask] = group_advantages(terms[0, mask], group_ids[mask], global_std=self.global_std)
        return adv[self.global_rank * n:(self.global_rank + 1) * n] if adv.shape[0] != n else adv

    # ------------------------------------------------------------------ training
    def training_units(self, rollout: Rollout) -> list:
        """The separately back-propagated pieces of one micro-batch's loss (trained steps, times ...)."""
        return list(range(len(rollout.train_steps)))

    def training_loss(self, rollout: Rollout, advantages: torch.Tensor, idx: torch.Tensor, unit) -> dict[str, torch.Tensor]:
        """Loss terms for samples ``idx`` of ``rollout`` on one training unit; ``loss`` is back-propagated."""
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        prompts, group_ids = batch["prompt"], batch["group_id"]
        if self.async_rewards:
            with AsyncScorer(self.reward_fn, prompts) as scorer:
                rollout = self.rollout(prompts, group_ids, on_chunk=scorer.submit)
                scored = scorer.result()
        else:
            rollout = self.rollout(prompts, group_ids)
            scored = None
        with self.profile("reward"):
            rewards, keep = self._score_rollout(rollout.images, prompts, group_ids.cpu(), scored)
        if keep is not None and not keep.any():
            self.iteration += 1  # nothing left to train on: no update this iteration
            return
        with self.profile("advantages"):
            advantages = self.compute_advantages(rewards, group_ids.cpu(), keep).to(self.device)
        with self.profile("logging"):
            self._log_rewards(rewards if keep is None else rewards[keep])

        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        n, gas = len(prompts), self.gradient_accumulation_steps
        logs: dict[str, list[torch.Tensor]] = {}
        first_update_ratios: list[torch.Tensor] = []  # before the iteration's first optimizer step
        with self.profile("frozen_velocities"):  # decoupled trainers: the old / EMA / reference velocities
            units = self.training_units(rollout)
        plan = []  # (inner epoch, sample indices) of every micro-batch of the iteration
        for epoch in range(self.num_inner_epochs):
            # The first epoch keeps the rollout's batching: on-policy log-probs reproduce exactly.
            gen = self._generator(self.iteration, epoch, 104729)
            order = torch.arange(n) if epoch == 0 else torch.randperm(n, generator=gen)
            for sl in self.sampler.chunks(n):
                idx = order[sl] if keep is None else order[sl][keep[order[sl]]]
                if len(idx):
                    plan.append((epoch, idx))
        self._bad_loss = None
        self.weights_as_sampled = True  # until the iteration's first optimizer step
        for micro, (epoch, idx) in enumerate(plan):
            # The last micro-batch of an optimizer step: its last backward all-reduces the accumulated gradients
            # (DDP); the others accumulate locally (no_sync).
            steps_now = (micro + 1) % gas == 0 or micro == len(plan) - 1
            for u, unit in enumerate(units):
                with self.profile("train_forward"):
                    out = self.training_loss(rollout, advantages, idx, unit)
                    loss = out["loss"]
                    self._check_loss(loss)
                with self.profile("backward"):
                    self._backward(loss / (len(units) * gas), sync=steps_now and u == len(units) - 1)
                for k, v in out.items():
                    logs.setdefault(k, []).append(v.detach().float().reshape(-1).cpu())
                if micro < gas and epoch == 0 and "ratio" in out:
                    first_update_ratios.append(out["ratio"].detach().double().reshape(-1).cpu())
            if steps_now:
                with self.profile("optimizer"):
                    self._optimizer_step(optimizer, scheduler, logs)
                self.weights_as_sampled = False
        if first_update_ratios:
            # On-policy the first update reproduces the rollout's log-probs: any deviation from 1 is a mismatch
            # between training and rollout (precision, batching), the diagnostic the papers' users watch.
            deviation = (torch.cat(first_update_ratios) - 1.0).abs().max()
            self.log("train/ratio_first_update_max_abs_dev", deviation.float())
        with self.profile("logging"):
            self._log_train(logs)
        self.iteration += 1

    def _world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def _check_loss(self, loss: torch.Tensor) -> None:
        """A non-finite loss raises before its backward. With several processes every rank must take part in every
        backward's all-reduce, so the loss is only noted here and every rank raises at the optimizer step."""
        if torch.isfinite(loss):
            return
        message = (f"non-finite loss {loss.item()} at iteration {self.iteration}; no update was made. "
                   "Lower the learning rate or check the reward and the inputs.")
        if self._world_size() == 1:
            raise FloatingPointError(message)
        self._bad_loss = self._bad_loss or message

    def _backward(self, loss: torch.Tensor, sync: bool) -> None:
        """``manual_backward``; without ``sync`` under DDP, no gradient all-reduce (an accumulation micro-step)."""
        strategy = self.trainer.strategy
        if sync or not isinstance(strategy, ParallelStrategy):
            self.manual_backward(loss)
            return
        with strategy.block_backward_sync():
            self.manual_backward(loss)

    def _optimizer_step(self, optimizer, scheduler, logs):
        # The norm is measured before clipping, so an explosion shows in train/grad_norm.
        grads = [p.grad for p in self.policy.trainable_parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) if grads else torch.zeros(())
        bad = self._bad_loss is not None or not bool(torch.isfinite(norm))
        if self._world_size() > 1:  # every rank decides alike (sharded gradients may differ in finiteness)
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            optimizer.zero_grad(set_to_none=True)
            if self._bad_loss is not None:
                raise FloatingPointError(self._bad_loss)
            if self._world_size() > 1 and bool(torch.isfinite(norm)):
                raise FloatingPointError(f"a non-finite loss or gradient on another process at iteration "
                                         f"{self.iteration}; no update was made on any process")
            raise FloatingPointError(f"non-finite gradient at iteration {self.iteration}; no update was made")
        logs.setdefault("grad_norm", []).append(norm.detach().reshape(-1).cpu())
        clipped = bool(self.max_grad_norm) and bool(norm > self.max_grad_norm)
        logs.setdefault("grad_clipped", []).append(torch.tensor([float(clipped)]))
        if self.max_grad_norm:
            self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()

    def _score_rollout(self, images, prompts, group_ids, scored=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rewards and the samples to train on (``None``: all). ``on_reward_error: stop`` raises on any failure
        (before any update); ``skip_group`` drops every group with a failed sample and logs how many, and with
        several processes skips the whole iteration on every rank (their updates must stay in step).
        ``scored``: the ``(total, valid, errors)`` already computed (asynchronous scoring)."""
        total, valid, errors = scored if scored is not None else self.reward_fn.score(images, prompts, group_ids)
        if self.on_reward_error == "stop":
            # With several processes all of them stop, not only the one whose reward failed (the others would
            # wait in the next collective until the timeout).
            failed = bool(errors) if self._world_size() == 1 else \
                self.trainer.strategy.reduce_boolean_decision(bool(errors), all=False)
            if failed:
                raise RewardError(self.reward_fn.stop_message(errors) if errors else
                                  "the reward failed on another process; training stops there and here, no update made")
            return total, None
        keep = ~torch.isin(group_ids, group_ids[~valid])  # samples whose whole group scored
        if self._world_size() > 1 and self.trainer.strategy.reduce_boolean_decision(not bool(valid.all()), all=False):
            keep = torch.zeros_like(keep)
        skipped = int(torch.unique(group_ids[~keep]).numel())
        self.log("train/reward_skipped_groups", float(skipped), batch_size=len(prompts))
        if errors:
            rank_zero_warn(f"iteration {self.iteration}: dropped {skipped} group(s) after a reward failure: "
                           + "; ".join(errors))
        if not valid.all():
            total = torch.where(valid, total, torch.zeros_like(total))
        return total, (None if keep.all() else keep)

    def _log_rewards(self, rewards: torch.Tensor) -> None:
        self.log("train/reward_mean", rewards.mean(), prog_bar=True, batch_size=len(rewards))
        self.log("train/reward_std", rewards.std(unbiased=False), batch_size=len(rewards))
        for name, terms in getattr(self.reward_fn, "last_terms", {}).items():
            if len(self.reward_fn.last_terms) > 1:
                self.log(f"train/reward_{name}", terms.nanmean(), batch_size=len(rewards))  # (dropped: NaN)

    def _log_train(self, logs: dict[str, list[torch.Tensor]]) -> None:
        for key, values in logs.items():
            v = torch.cat(values)
            if key == "ratio":
                self.log("train/ratio_mean", v.mean())
                self.log("train/ratio_min", v.min())
                self.log("train/ratio_max", v.max())
            else:
                self.log(f"train/{key}", v.mean(), prog_bar=key == "loss")
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        self.log("train/iteration", float(self.iteration), prog_bar=True)

    # ------------------------------------------------------------------ validation
    def validation_sampling(self) -> dict[str, Any]:
        """Validation's sampling settings, ``eval`` where set, else the training values: ``num_inference_steps``,
        ``guidance_scale``, ``height``, ``width`` (also what ``flowrl sample`` uses for a run's checkpoint)."""
        cfg = self.eval_config
        h, w = _hw(cfg.resolution or [self.height, self.width])
        return {"num_inference_steps": cfg.num_inference_steps or self.num_inference_steps,
                "guidance_scale": self.guidance_scale if cfg.guidance_scale is None else cfg.guidance_scale,
                "height": h, "width": w}

    def validation_step(self, batch, batch_idx):
        prompts = batch["prompt"]
        s = self.validation_sampling()
        gen = self._generator(self.eval_config.seed, batch_idx, self.global_rank, 7919)
        out = self.sampler.sample(prompts, s["height"], s["width"], s["num_inference_steps"], s["guidance_scale"], gen)
        rewards = self.reward_fn(out.images, prompts)
        self._update_val_metrics(out.images, prompts, rewards)
        return {"images": out.images, "prompts": list(prompts), "rewards": rewards}

    def _update_val_metrics(self, images, prompts, rewards):
        self.val_metrics["reward"].update(rewards.to(self.device))
        for name, reward in getattr(self.reward_fn, "rewards", {}).items():
            if not hasattr(reward, "evaluate"):
                continue
            for verdict in reward.evaluate(images, prompts):
                key = f"{name}_acc_{verdict.category}"
                if key not in self.val_metrics:
                    self.val_metrics[key] = MeanMetric().to(self.device)
                self.val_metrics[key].update(torch.tensor(float(verdict.correct), device=self.device))

    def on_validation_epoch_end(self):
        """Logs ``val/reward`` and, for verifier rewards, per-category and overall accuracy (the mean
        over categories, as GenEval). Also kept in ``last_validation_metrics``, including for the
        sanity-check run before training (Lightning does not log that one)."""
        values: dict[str, torch.Tensor] = {}
        by_reward: dict[str, list[torch.Tensor]] = {}
        # compute() all-gathers across processes: every process computes the metrics any process updated (a
        # category may be missing from one process's share of the prompts), in the same order, or they hang.
        updated = torch.tensor([float(m.update_called) for m in self.val_metrics.values()], device=self.device)
        if self._world_size() > 1:
            updated = self.trainer.strategy.reduce(updated, reduce_op="sum")
        for (key, metric), any_updated in zip(self.val_metrics.items(), updated.tolist()):
            if not any_updated:
                continue
            values[f"val/{key}"] = metric.compute()
            if "_acc_" in key:
                by_reward.setdefault(key.split("_acc_")[0], []).append(values[f"val/{key}"])
            metric.reset()
        for name, accs in by_reward.items():
            values[f"val/{name}_acc_overall"] = torch.stack(accs).mean()
        for key, value in values.items():
            self.log(key, value, prog_bar=key.endswith("_overall"))
        self.last_validation_metrics = {k: float(v) for k, v in values.items()}
