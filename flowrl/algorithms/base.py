"""What every algorithm shares: the wiring of policy, sampler, rewards and update loop, and the Lightning hooks.
A subclass says what a rollout stores, which dynamics it trains with and how stored data becomes a loss; one
iteration (``training_step``) reads sample -> score -> advantages -> update -> log."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning as L
import torch

from callbacks import ReferenceModel
from flowrl.advantages import resolve_advantage_estimator
from flowrl.algorithms import metrics, options, rollouts, scores, update
from flowrl.algorithms.options import EvalConfig, hw
from flowrl.checkpoint import check_trained_state, save_trained_state, use_atomic_checkpoints
from flowrl.dynamics import Dynamics, FlowSDE, TrainSteps
from flowrl.errors import ConfigError
from flowrl.policy import FlowMatchingPolicy, PolicyConfig
from flowrl.rewards import RewardScores, RewardSpec
from flowrl.rewards.scoring import AsyncScorer
from flowrl.rollout import Rollout, RolloutSampler, keyed_generator, per_sample_generators

__all__ = ["EvalConfig", "FlowRLModule"]

OptimizerCallable = Callable[[Iterable], torch.optim.Optimizer]
LRSchedulerCallable = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class FlowRLModule(L.LightningModule):
    """Base class; use a concrete algorithm (``GRPO``, ...).

    Args:
        policy: the pretrained pipeline and which of its parameters train.
        rewards: reward terms: ``{name: <registered>, args: {...}}`` or ``{class_path: ..., init_args: {...}}``,
            each with a ``weight`` and a log ``label`` (null = jpeg_compressibility).
        eval_rewards: reward terms scored at validation only, in the same form (``val/reward`` is their weighted
            sum, ``val/reward_<label>`` each term's); null = validation scores with ``rewards``.
        group_size: samples per prompt; advantages are normalised within each group.
        resolution: image size of rollouts, an int or [height, width].
        num_inference_steps: sampling steps of a rollout (and of validation unless ``eval`` sets its own).
        guidance_scale: classifier-free guidance of rollouts (FLUX dev: its distilled guidance; 1 = none).
        eval: validation sampling (always ODE): resolution, num_inference_steps, guidance_scale, seed;
            null fields take the training values.
        dynamics: the rule of the trained sampling steps, ``{class_path: flowrl.dynamics.FlowSDE, init_args:
            {noise_level: 0.7}}`` (DanceSDE, CPS, or ODE for decoupled algorithms); null = the algorithm's default.
        step_selection: which sampling steps are trained (stochastic): ``flowrl.dynamics.TrainSteps`` (train_steps,
            num_train_steps) or ``flowrl.dynamics.SlidingWindow`` (MixGRPO); null = every step but the last.
        num_inner_epochs: passes of updates over each iteration's rollouts.
        train_batch_size: samples per micro-batch, of the rollout's forward passes and of the updates alike;
            null = the whole batch.
        rollout_batch_size: samples per forward pass of the rollout's untrained steps (the trained ones keep
            train_batch_size, so log-probs stay exact), as many as memory allows; null = train_batch_size.
        latent_storage_dtype: dtype of the rollout's stored latents, float32, bfloat16 or float16 (the trained steps'
            inputs and samples, rounded as the rollout makes them: on-policy ratios stay exactly 1); float32 where
            the algorithm stores no trajectory (nft, awm ...). docs/performance.md.
        offload_rollout: keep the rollout's stored tensors in host memory from sampling to training, each
            micro-batch read back as it trains (values unchanged).
        gradient_accumulation_steps: micro-batches per optimizer step.
        max_grad_norm: clip the gradient norm to this before each optimizer step; null = no clipping.
        adv_clip_range: clamp the advantages to [-c, c] or [low, high]; null = no clamp.
        global_std: divide advantages by the std of the whole batch (every process) instead of the group's.
        advantage_estimator: a registered estimator (``group``: normalise the weighted reward sum per group;
            ``gdpo``: normalise each reward per group, then their weighted sum over the batch) or the import path
            of a function (:class:`flowrl.advantages.AdvantageEstimator`).
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
    #: the algorithm recomputes the rollout's guided velocities at the trained steps (coupled algorithms), so the
    #: unconditional branch there can be kept from the rollout (:meth:`stores_uncond_velocity`)
    recomputes_rollout_velocities: bool = False
    #: the seed's name of the algorithm (``trainer_type``), used in messages
    trainer_type: str = ""

    def __init__(
        self,
        policy: PolicyConfig,
        rewards: list[RewardSpec | dict[str, Any]] | None = None,
        eval_rewards: list[RewardSpec | dict[str, Any]] | None = None,
        group_size: int = 8,
        resolution: int | list[int] = 512,
        num_inference_steps: int = 10,
        guidance_scale: float = 4.5,
        eval: EvalConfig | None = None,
        dynamics: Dynamics | None = None,
        step_selection: TrainSteps | None = None,
        num_inner_epochs: int = 1,
        train_batch_size: int | None = None,
        rollout_batch_size: int | None = None,
        latent_storage_dtype: str = "float32",
        offload_rollout: bool = False,
        gradient_accumulation_steps: int = 1,
        max_grad_norm: float | None = 1.0,
        adv_clip_range: float | list[float] | None = 5.0,
        global_std: bool = False,
        advantage_estimator: str = "group",
        on_reward_error: str = "stop",
        async_rewards: bool = False,
        same_initial_noise: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.dynamics = dynamics if dynamics is not None else self.default_dynamics()
        self._save_plain_hyperparameters(policy, rewards, eval_rewards)
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the trained parameters
        self.eval_config = EvalConfig(**eval) if isinstance(eval, dict) else (eval or EvalConfig())
        self.group_size = group_size
        self.height, self.width = hw(resolution)
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        self.num_inner_epochs, self.train_batch_size = num_inner_epochs, train_batch_size
        self.gradient_accumulation_steps, self.max_grad_norm = gradient_accumulation_steps, max_grad_norm
        self.adv_clip_range, self.global_std = adv_clip_range, global_std
        self.same_initial_noise, self.async_rewards = same_initial_noise, async_rewards
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.seed = seed
        # Configuration errors surface here, before any weights load.
        options.check_shared_numbers(group_size, num_inner_epochs, gradient_accumulation_steps, train_batch_size,
                             rollout_batch_size, resolution, num_inference_steps, guidance_scale, max_grad_norm,
                             adv_clip_range, self.eval_config)
        storage = options.rollout_storage(latent_storage_dtype, offload_rollout, self.stores_trajectory,
                                          self.trainer_type)
        self.on_reward_error = on_reward_error
        self.advantage_estimator = resolve_advantage_estimator(advantage_estimator)
        self.check_dynamics()
        self.step_selector = (step_selection or TrainSteps()).bind(num_inference_steps, seed)
        self.reward_fn = scores.reward_function(rewards, on_reward_error, async_rewards, rollout_batch_size)
        policy = PolicyConfig(**policy) if isinstance(policy, dict) else policy
        self.policy = policy if isinstance(policy, FlowMatchingPolicy) else FlowMatchingPolicy.from_config(policy)
        self.policy.check_resolution(self.height, self.width)
        self.sampler = RolloutSampler(self.policy, self.dynamics, train_batch_size, rollout_batch_size, self.profile,
                                      storage)
        sigmas = self.policy.sigmas(num_inference_steps, self.height, self.width)
        options.check_schedule(self.dynamics, sigmas, self.step_selector.train_steps)
        self.check_guidance(guidance_scale, self.eval_config.guidance_scale)
        self.policy.check_resolution(*hw(self.eval_config.resolution or [self.height, self.width]))
        self.val_metrics = metrics.ValidationMetrics(scores.reward_function(eval_rewards, on_reward_error, False, None)
                                                     if eval_rewards else self.reward_fn)
        self.iteration = 0

    def default_dynamics(self) -> Dynamics:
        """The dynamics of a config that names none (coupled algorithms: Flow-SDE at noise level 0.7)."""
        return FlowSDE()

    def _save_plain_hyperparameters(self, policy, rewards, eval_rewards) -> None:
        """Hyper-parameters as plain data (checkpoints then load with ``weights_only=True``)."""
        ignore = ["optimizer", "lr_scheduler"] + (["policy"] if isinstance(policy, FlowMatchingPolicy) else [])
        ignore += [k for k, v in (("rewards", rewards), ("eval_rewards", eval_rewards)) if callable(v)]
        self.save_hyperparameters(ignore=ignore, logger=False)
        for key in list(self.hparams):
            self.hparams[key] = options.plain(self.hparams[key])

    def check_dynamics(self) -> None:
        """Refuse sampling dynamics this algorithm cannot train with (called in ``__init__``, before loading)."""
        options.check_trainable_dynamics(self.dynamics, self.needs_log_prob, self.trainer_type)

    def check_guidance(self, *guidance_scales: float | None) -> None:
        """Guidance scales the model family cannot use (e.g. any but 1 on FLUX.1-schnell) fail at construction."""
        check = getattr(self.policy.adapter, "check_guidance", None)
        for scale in [g for g in guidance_scales if g is not None and check is not None]:
            check(scale)

    def configure_optimizers(self):
        params = list(self.policy.trainable_parameters())
        if not params:
            raise ConfigError("the policy has no trainable parameters; check finetune_type / target_modules")
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    def configure_model(self):  # FSDP2 under a ModelParallelStrategy, on its device mesh
        if self.device_mesh is not None:
            self.policy.shard(self.device_mesh)

    def on_fit_start(self):
        data_group = getattr(getattr(self.trainer, "datamodule", None), "group_size", None)
        if data_group is not None and data_group != self.group_size:
            raise ConfigError(f"model.group_size={self.group_size} but data.group_size={data_group}; set them equal")
        for part in ("train_rows", "val_rows"):  # condition images the family cannot use, or needs and lacks
            rows = getattr(getattr(self.trainer, "datamodule", None), part, None)
            if rows is not None:
                self.policy.check_conditions(rows.images)
        ref = self.kl_reference
        if ref is not None and ref.kl_type == "x-based" and not self.dynamics.is_stochastic:
            raise ConfigError(f"kl_type 'x-based' compares the SDE step means, which dynamics {self.dynamics.name!r} "
                              "does not have; use kl_type: v-based or stochastic dynamics")
        use_atomic_checkpoints(self.trainer)  # a run killed while saving keeps its last checkpoint readable
        metrics.announce(self)

    def on_save_checkpoint(self, checkpoint):  # the trained parameters only
        save_trained_state(self, checkpoint)

    def on_load_checkpoint(self, checkpoint):
        check_trained_state(self, checkpoint)
        self.iteration = checkpoint.get("flowrl_iteration", 0)

    def callbacks_of(self, kind: type | Callable[[Any], bool]) -> list:
        """The trainer's callbacks that are instances of ``kind`` (a class) or for which ``kind(callback)`` holds."""
        found = getattr(self._trainer, "callbacks", None) or []
        return [cb for cb in found if (isinstance(cb, kind) if isinstance(kind, type) else kind(cb))]

    def reference_context(self):
        """The cheap reference model, for :class:`callbacks.ReferenceModel`: with LoRA, the policy with its
        adapters disabled (the base model, no copy); with full fine-tuning None (the callback keeps a copy)."""
        return self.policy.adapter_disabled() if self.policy.finetune_type == "lora" else None

    @property
    def kl_reference(self) -> ReferenceModel | None:
        """The trainer's :class:`callbacks.ReferenceModel` when it asks for a KL term (``kl_beta > 0``), else None."""
        found = self.callbacks_of(ReferenceModel)
        if len(found) > 1:
            raise RuntimeError(f"found {len(found)} ReferenceModel callbacks; keep one in trainer.callbacks")
        return found[0] if found and found[0].enabled else None

    def profile(self, phase: str):
        """A phase of the iteration under the Trainer's profiler, as ``[flowrl] <phase>`` (``--trainer.profiler=simple``
        splits each iteration into its phases; ``benchmarks/overhead.py`` reads the same records)."""
        profiler = getattr(self._trainer, "profiler", None)
        return profiler.profile(f"[flowrl] {phase}") if profiler is not None else contextlib.nullcontext()

    def _generator(self, *salt) -> torch.Generator:
        return keyed_generator(self.seed, *salt)

    def _sample_generators(self, n: int, *salt) -> list[torch.Generator]:
        """One generator per sample of this process's batch of ``n``, keyed by its index in the global batch."""
        return per_sample_generators(self.seed, n, *salt, first=self.global_rank * n)

    def stores_uncond_velocity(self, guidance_scale: float) -> bool:
        """Whether a rollout keeps the unconditional CFG branch of its trained steps for training to reuse."""
        return rollouts.keeps_uncond_branch(self, guidance_scale)

    def rollout(self, prompts: Sequence[str], group_ids=None, on_chunk: Callable | None = None,
                conditions: Sequence | None = None) -> Rollout:
        """Samples of ``prompts`` (with their condition images, ``conditions``, where the rows have some) for
        training (:func:`flowrl.algorithms.rollouts.draw`)."""
        return rollouts.draw(self, prompts, group_ids, on_chunk, conditions)

    def compute_advantages(self, scores_: RewardScores, group_ids: torch.Tensor,
                           keep: torch.Tensor | None = None) -> torch.Tensor:
        """This process's advantages (``advantage_estimator`` over the groups of every process)."""
        return scores.advantages(self, scores_, group_ids, keep)

    def training_units(self, rollout: Rollout) -> list:
        """The separately back-propagated pieces of one micro-batch's loss (trained steps, times ...)."""
        return list(range(len(rollout.train_steps)))

    def training_loss(self, rollout: Rollout, advantages: torch.Tensor, idx: torch.Tensor, unit) -> dict[str, torch.Tensor]:
        """Loss terms for samples ``idx`` of ``rollout`` on one training unit; ``loss`` is back-propagated."""
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        prompts, group_ids = batch["prompt"], batch["group_id"].cpu()
        conditions = batch.get("condition_images")
        if self.async_rewards:
            with AsyncScorer(self.reward_fn, prompts, conditions) as scorer:
                rollout = self.rollout(prompts, group_ids, on_chunk=scorer.submit, conditions=conditions)
                scored = scorer.result()
        else:
            rollout, scored = self.rollout(prompts, group_ids, conditions=conditions), None
        with self.profile("reward"):
            scored = scored or self.reward_fn.score(rollout.images, prompts, group_ids, conditions)
            scored, keep = scores.accept_scores(self, scored, group_ids)
        if keep is None or keep.any():
            with self.profile("advantages"):
                advantages = self.compute_advantages(scored, group_ids, keep).to(self.device)
            with self.profile("logging"):
                metrics.log_rewards(self, scored, keep)
            logs = update.run_updates(self, rollout, advantages, keep)
            with self.profile("logging"):
                metrics.log_train(self, logs)
        self.iteration += 1  # (no update when every group was dropped)

    def validation_sampling(self) -> dict[str, Any]:
        """Validation's sampling settings, ``eval`` where set, else the training values: ``num_inference_steps``,
        ``guidance_scale``, ``height``, ``width`` (also what ``flowrl sample`` uses for a run's checkpoint)."""
        cfg = self.eval_config
        h, w = hw(cfg.resolution or [self.height, self.width])
        return {"num_inference_steps": cfg.num_inference_steps or self.num_inference_steps,
                "guidance_scale": self.guidance_scale if cfg.guidance_scale is None else cfg.guidance_scale,
                "height": h, "width": w}

    def validation_step(self, batch, batch_idx):
        prompts = batch["prompt"]
        s = self.validation_sampling()
        gen = self._generator(self.eval_config.seed, batch_idx, self.global_rank, 7919)
        conditions = batch.get("condition_images")
        out = self.sampler.sample(prompts, s["height"], s["width"], s["num_inference_steps"], s["guidance_scale"], gen,
                                  conditions=conditions)
        rewards = self.val_metrics.record(out.images, prompts, self.device, conditions)
        return {"images": out.images, "prompts": list(prompts), "rewards": rewards}

    def on_validation_epoch_end(self):
        """Logs ``val/reward`` and a verifier's per-category and overall accuracy; also kept in
        ``last_validation_metrics`` (for the sanity-check run before training too, which Lightning does not log)."""
        several = update.world_size(self) > 1
        values = self.val_metrics.compute(
            (lambda t: self.trainer.strategy.reduce(t, reduce_op="sum")) if several else None)
        for key, value in values.items():  # equal on every process already: sync_dist averages equal values
            self.log(key, value, prog_bar=key.endswith("_overall"), sync_dist=several)
        self.last_validation_metrics = {k: float(v) for k, v in values.items()}

