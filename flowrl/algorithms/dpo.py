"""Diffusion-DPO: preference optimisation on the denoising errors of the policy against a frozen reference.

Two ways to get the preference pairs:

* :class:`DiffusionDPO` (``trainer_type: dpo``, online): rollouts are sampled and scored as for the other
  algorithms; inside each group the sample with the highest advantage is "chosen" and the one with the lowest
  "rejected" (:func:`flowrl.losses.dpo.dpo_pairs`; a group whose advantages are all equal gives no pair).
* :class:`OfflineDPO` (offline): pairs come from a preference dataset (prompt, chosen image, rejected image),
  :class:`flowrl.preference_data.PreferenceDataModule`; the images are encoded by the policy's VAE and nothing is
  sampled during training (validation still samples and scores).

Both train on the forward process, as the decoupled algorithms do: per pair and training unit one noise level
``t`` (``time_sampling_strategy``, ``time_shift``, ``timestep_fraction``, ``num_train_timesteps``) and one noise
``eps``, shared by the two arms; ``x_t = (1 - t) x0 + t eps`` for each arm's clean latent ``x0``; the per-arm error
``mean((v - (eps - x0))**2)`` of the policy and of the reference; then the Bradley-Terry loss
:func:`flowrl.losses.dpo.dpo_loss`::

    logits = -dpo_beta / 2 * ((err_w - err_l) - (ref_err_w - ref_err_l))
    loss   = mean(-logsigmoid(logits))

The reference is the model before fine-tuning: with LoRA the policy with its adapters disabled (no copy), with full
fine-tuning a frozen copy of the trained parameters taken at fit start (a :class:`callbacks.ReferenceModel` held
by the module, kept in checkpoints so a resumed run keeps the original reference). Its errors are computed once
per iteration, before any update, without gradient.

What this matches, and where it differs
---------------------------------------
* The loss: ``SalesforceAIResearch/DiffusionDPO``, ``train.py`` (the Diffusion-DPO authors' script): per-sample
  MSE of model and reference on the preferred and the dispreferred image, the same noise and timestep for both,
  ``inside = -0.5 * beta_dpo * (model_diff - ref_diff)``, ``loss = -logsigmoid(inside).mean()``, implicit accuracy
  ``inside > 0``; ``beta_dpo`` (default 5000) is the paper's ``beta * T`` folded into one number. Differences:
  flowrl predicts a flow-matching velocity, so the regression target is ``eps - x0`` (their SD1.5/SDXL UNets
  predict ``eps``, the target is the noise); they draw one DDPM timestep uniformly from 1000, flowrl draws noise
  levels with its shared time sampling; they drop 20% of the prompts (``proportion_empty_prompts``), flowrl
  drops none.
* The online pairing, beta and reference: ``X-GenGroup/Flow-Factory``, ``src/flow_factory/trainers/rl/dpo.py``
  (``DPOTrainer._form_pairs_from_advantages``, ``_preference_loss``) with its options in
  ``src/flow_factory/hparams/training_args/dpo.py``: per group the highest-advantage sample is chosen and the
  lowest rejected (argmax / argmin, first index on ties), one pair per group; ``beta`` 2000 by default; both arms
  noised at one ``sigma`` with one noise tensor; the target velocity ``noise - x0``; the reference model always
  required. Differences: a group whose advantages are all equal gives no pair here (their argmax and argmin then
  pick the same sample, a zero-gradient term that still counts in the mean); the reference errors are
  precomputed once per iteration (the reference is frozen, so the values are those of computing them per
  micro-batch); their ``timestep_range`` + ``weighting_scheme: logit_normal`` correspond to flowrl's
  ``timestep_fraction`` + ``time_sampling_strategy: logit_normal``.
* Micro-batches: flowrl's update loop (:mod:`flowrl.algorithms.update`) walks the rollout's samples in
  ``train_batch_size`` chunks; a micro-batch trains the pairs whose *chosen* sample it holds (each pair once per
  inner epoch). A micro-batch holding no chosen sample contributes an exact zero (a zero-valued loss touching the
  trained parameters, so gradient synchronisation across processes still sees every parameter). An iteration
  without any pair makes no update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from callbacks import ReferenceModel
from flowrl.algorithms import metrics, update
from flowrl.algorithms.decoupled import _TIMES_SALT, DecoupledModule
from flowrl.dynamics.timesampling import sample_train_times
from flowrl.errors import ConfigError
from flowrl.losses.dpo import denoising_error, dpo_loss, dpo_pairs
from flowrl.policy import PolicyConfig
from flowrl.rewards import RewardScores
from flowrl.rollout import ForwardProcess, Rollout
from flowrl.validation import check_number

__all__ = ["DiffusionDPO", "OfflineDPO", "PairedForwardProcess"]

_VAE_SALT = 314159  # separates the VAE posterior draws of offline pairs from the other draws


@dataclass
class PairedForwardProcess(ForwardProcess):
    """:class:`~flowrl.rollout.ForwardProcess` of a DPO iteration: ``times`` ``(B, K)`` and ``noise``
    ``(K, B, ...)`` are drawn per sample as for the decoupled algorithms, and a pair uses its chosen sample's.

    Attributes:
        pairs: ``(P, 2)`` sample indices, column 0 chosen, column 1 rejected.
        ref_errors: ``(K, P, 2)`` float32 denoising errors of the reference on the chosen and rejected arm.
    """

    pairs: Tensor | None = None
    ref_errors: Tensor | None = None


class DiffusionDPO(DecoupledModule):
    """``trainer_type: dpo``: online Diffusion-DPO on pairs formed inside each group of rollouts.

    Rollouts keep only their clean latents (any ``dynamics``; the ODE by default). After scoring, each group's
    highest-advantage sample is paired (chosen) with its lowest (rejected); a group whose advantages are all
    equal gives no pair. Each pair is trained at ``num_train_timesteps`` noise levels, the two arms at the same
    ``t`` and noise, against the frozen reference (the adapter-disabled model under LoRA, a copy of the trained
    parameters under full fine-tuning): :func:`flowrl.losses.dpo.dpo_loss`. The module docstring lists the code
    this matches and the differences.

    Takes :class:`~flowrl.algorithms.decoupled.DecoupledModule`'s options as well (``train_guidance_scale``: the
    guidance of the trained velocity, 1 = none).

    Args:
        dpo_beta: the DPO temperature ``beta`` (the paper's ``beta * T``), > 0; larger keeps the policy closer to the
            reference. Flow-Factory's ``beta`` (2000 by default), the Diffusion-DPO script's ``beta_dpo`` (5000).
        ref_param_device: where the reference copy of full fine-tuning lives: ``cpu`` (default), ``same_as_model``
            or a torch device string; unused under LoRA (the reference is the adapter-disabled model).
    """

    trainer_type = "dpo"

    def __init__(self, policy: PolicyConfig, dpo_beta: float = 2000.0, ref_param_device: str = "cpu", **kwargs):
        check_number("dpo_beta", dpo_beta, 0, low_open=True, hint=" (Flow-Factory's default is 2000)")
        try:
            reference = ReferenceModel(kl_beta=1.0, kl_type="v-based", ref_param_device=ref_param_device)
        except ValueError as e:
            raise ConfigError(f"ref_param_device={ref_param_device!r}: {e}") from e
        super().__init__(policy, **kwargs)
        self.dpo_beta = float(dpo_beta)
        self.ref_param_device = ref_param_device
        #: the frozen reference (built at fit start): a context over the adapter-disabled model, or a copy
        self.dpo_reference = reference
        self._pairs: Tensor | None = None  # this iteration's pairs, from compute_advantages to training_units

    # ------------------------------------------------------------------ the reference
    def build_reference(self) -> None:
        """Make the reference from the weights as they are now (fit start does this; call it outside ``fit``)."""
        self.dpo_reference.build(self)

    def on_fit_start(self):
        ref = self.kl_reference
        if ref is not None:
            raise ConfigError(
                f"trainer_type {self.trainer_type!r} already trains relative to the reference model (dpo_beta sets how "
                f"closely); remove callbacks.ReferenceModel from trainer.callbacks or set its kl_beta: 0"
            )
        super().on_fit_start()
        self.dpo_reference.on_fit_start(self.trainer, self)  # builds it (and restores a resumed run's copy)

    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        checkpoint["flowrl_dpo_reference"] = self.dpo_reference.state_dict()

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        if "flowrl_dpo_reference" in checkpoint:
            self.dpo_reference.load_state_dict(checkpoint["flowrl_dpo_reference"])

    # ------------------------------------------------------------------ pairs
    def compute_advantages(self, scores_: RewardScores, group_ids: Tensor, keep: Tensor | None = None) -> Tensor:
        """The advantages, and this iteration's pairs from them (highest and lowest of each group)."""
        advantages = super().compute_advantages(scores_, group_ids, keep)
        self._pairs = dpo_pairs(advantages, group_ids, keep)
        return advantages

    def set_pairs(self, pairs: Tensor) -> None:
        """Use ``pairs`` (``(P, 2)`` chosen, rejected sample indices) for the next :meth:`training_units`."""
        pairs = torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 2)
        self._pairs = pairs

    # ------------------------------------------------------------------ forward-process data
    def _draw_times_and_noise(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """Per sample, as the other decoupled algorithms: ``(B, K)`` noise levels and ``(K, B, ...)`` noise."""
        n = rollout.final.shape[0]
        times, noise = [], []
        for gen in self._sample_generators(n, self.iteration, _TIMES_SALT):
            times.append(sample_train_times(self.time_sampling_strategy, 1, self.num_train_timesteps, rollout.sigmas,
                                            self.time_shift, self.timestep_fraction, gen))
            noise.append(torch.randn((times[-1].shape[1], 1, *rollout.final.shape[1:]), generator=gen,
                                     dtype=torch.float32))
        device = rollout.final.device
        return torch.cat(times).to(device), torch.cat(noise, dim=1).to(device)

    def _pair_errors(self, rollout: Rollout, pair_rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Denoising errors ``(err_w, err_l)``, ``(p,)`` each, of the model as it is now on pairs ``pair_rows`` of
        ``rollout.forward.pairs`` at unit ``k``: both arms at the chosen sample's ``t`` and ``eps``."""
        f = rollout.forward
        chosen, rejected = f.pairs[pair_rows, 0], f.pairs[pair_rows, 1]
        t = f.times[chosen, k]
        eps = f.noise[k, chosen]
        x0 = torch.cat([rollout.final[chosen], rollout.final[rejected]])
        eps2, t2 = torch.cat([eps, eps]), torch.cat([t, t])
        tc = self._column(t2, x0)
        x_t = (1.0 - tc) * x0 + tc * eps2
        cond = rollout.cond.select(torch.cat([chosen, rejected]))
        v = self.policy.velocity(x_t, t2, cond, self.train_guidance_scale)
        err = denoising_error(v, eps2 - x0)
        return err[: len(pair_rows)], err[len(pair_rows):]

    def _pair_chunks(self, num_pairs: int) -> list[slice]:
        """Pairs per reference forward pass: half of ``train_batch_size`` (two arms each), at least one."""
        size = max(1, (self.train_batch_size or 2 * max(num_pairs, 1)) // 2)
        return [slice(i, min(i + size, num_pairs)) for i in range(0, num_pairs, size)]

    def training_units(self, rollout: Rollout) -> list[int]:
        """Draw this iteration's noise levels and noise, and compute the reference's errors on every pair (once,
        before any update). No pairs: no units (the iteration makes no update)."""
        pairs = self._pairs if self._pairs is not None else torch.zeros((0, 2), dtype=torch.long)
        self._pairs = None
        times, noise = self._draw_times_and_noise(rollout)
        rollout.forward = forward = PairedForwardProcess(times, noise, pairs=pairs.to(rollout.final.device))
        if self._trainer is not None and hasattr(self._trainer, "fit_loop"):
            self.log("train/dpo_pairs", float(len(pairs)), batch_size=1)
        if len(pairs) == 0:
            forward.ref_errors = torch.zeros((forward.num_units, 0, 2))
            return []
        units = list(range(forward.num_units))
        rows = torch.arange(len(pairs), device=forward.pairs.device)
        was_training = self.policy.training
        self.policy.eval()
        try:
            with self.dpo_reference.reference(self):
                per_unit = []
                for k in units:
                    errs = [torch.stack(self._pair_errors(rollout, rows[sl], k), dim=1)
                            for sl in self._pair_chunks(len(pairs))]
                    per_unit.append(torch.cat(errs))
                forward.ref_errors = torch.stack(per_unit)
        finally:
            self.policy.train(was_training)
        return units

    # ------------------------------------------------------------------ the loss
    def _zero_loss(self) -> dict[str, Tensor]:
        """An exact zero that reaches every trained parameter (a micro-batch without pairs)."""
        return {"loss": sum(p.sum() for p in self.policy.trainable_parameters()).float() * 0.0}

    def training_loss(self, rollout: Rollout, advantages: Tensor, idx: Tensor, k: int) -> dict[str, Tensor]:
        f = rollout.forward
        rows = torch.nonzero(torch.isin(f.pairs[:, 0], idx.to(f.pairs.device))).reshape(-1)
        if len(rows) == 0:
            return self._zero_loss()
        err_w, err_l = self._pair_errors(rollout, rows, k)
        ref = f.ref_errors[k, rows.to(f.ref_errors.device)].to(err_w.device)
        out = dpo_loss(err_w, err_l, ref[:, 0], ref[:, 1], self.dpo_beta)
        out["train_time_mean"] = f.times[f.pairs[rows, 0], k].detach().float().mean()
        return out


class OfflineDPO(DiffusionDPO):
    """Offline Diffusion-DPO: pairs from a preference dataset, no sampling in training.

    A training batch (:class:`flowrl.preference_data.PreferenceDataModule`) holds ``prompt`` and the ``chosen`` and
    ``rejected`` images in [0, 1]; the policy's VAE encodes both (a posterior sample, as the Diffusion-DPO script
    does, seeded by the run's ``seed``, the iteration and the pair), and each pair trains as in
    :class:`DiffusionDPO` (same loss, reference, noise-level sampling and update loop). ``resolution`` must be the
    dataset's image size. ``rewards``, ``eval`` and the sampling options serve validation only (which samples
    ``data.val_prompts`` and scores them); ``group_size`` is not used.

    Takes :class:`DiffusionDPO`'s options.
    """

    trainer_type = "dpo-offline"

    def on_fit_start(self):
        dm = getattr(self.trainer, "datamodule", None)
        size = getattr(dm, "resolution", None)
        if size is not None and tuple(size) != (self.height, self.width):
            raise ConfigError(
                f"model.resolution is {self.height}x{self.width} but the preference images are {size[0]}x{size[1]} "
                f"(data.resolution); set model.resolution: [{size[0]}, {size[1]}]"
            )
        super().on_fit_start()

    def _encode(self, images: Tensor) -> Tensor:
        """Images in [0, 1] to latents with the policy's VAE, the posterior draw seeded by (seed, iteration, rank)."""
        images = images.to(self.policy.device, torch.float32)
        device = images.device
        seed = int(torch.randint(0, 2**62, (1,), generator=self._generator(self.iteration, self.global_rank,
                                                                           _VAE_SALT)).item())
        devices = [device] if device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self.policy.adapter.encode_images(images).float()

    def pair_rollout(self, prompts: list[str], chosen: Tensor, rejected: Tensor) -> Rollout:
        """A batch of pairs as a rollout record: samples ``2i`` (chosen) and ``2i + 1`` (rejected) of prompt ``i``,
        with their pairs set for the next :meth:`training_units`."""
        if chosen.shape != rejected.shape or chosen.shape[0] != len(prompts):
            raise ValueError(f"{len(prompts)} prompts with chosen images {tuple(chosen.shape)} and rejected "
                             f"{tuple(rejected.shape)}: one chosen and one rejected image per prompt")
        latents = self._encode(torch.cat([chosen, rejected]))
        n = len(prompts)
        final = torch.stack([latents[:n], latents[n:]], dim=1).reshape(2 * n, *latents.shape[1:])
        images = torch.stack([chosen, rejected], dim=1).reshape(2 * n, *chosen.shape[1:]).float()
        doubled = [p for p in prompts for _ in range(2)]
        rollout = Rollout(doubled, self.policy.encode_prompt(doubled),
                          self.policy.sigmas(self.num_inference_steps, self.height, self.width), [], None, None, None,
                          None, final, images)
        self.set_pairs(torch.arange(2 * n).reshape(n, 2))
        return rollout

    def training_step(self, batch, batch_idx):
        prompts = list(batch["prompt"])
        with self.profile("encode_pairs"):
            rollout = self.pair_rollout(prompts, batch["chosen"], batch["rejected"])
        advantages = torch.zeros(len(rollout.prompts), device=self.device)  # (the pairs are given)
        logs = update.run_updates(self, rollout, advantages, None)
        with self.profile("logging"):
            metrics.log_train(self, logs)
        self.iteration += 1

