"""The shared options' types and limits: validation sampling, resolutions, numbers, and the schedule checks that
need the loaded policy. Every refusal names the option and the fix."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import asdict, dataclass, is_dataclass

import torch

from flowrl.errors import ConfigError
from flowrl.validation import check_number, check_range_option

__all__ = ["EvalConfig", "check_schedule", "check_shared_numbers", "check_trainable_dynamics", "component_config", "hw",
           "plain", "rollout_storage"]


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


def hw(resolution: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` of an int or [height, width] resolution."""
    if isinstance(resolution, int):
        return resolution, resolution
    if len(resolution) != 2:
        raise ConfigError(f"resolution must be an int or [height, width], got {resolution!r}")
    return int(resolution[0]), int(resolution[1])


def check_shared_numbers(group_size, num_inner_epochs, accumulation, train_batch_size, rollout_batch_size, resolution,
                         num_inference_steps, guidance_scale, max_grad_norm, adv_clip_range, eval_config) -> None:
    check_number("group_size", group_size, 2, hint=" (group-relative advantages need group_size >= 2)")
    check_number("num_inner_epochs", num_inner_epochs, 1)
    check_number("gradient_accumulation_steps", accumulation, 1)
    check_number("train_batch_size", train_batch_size, 1, allow_none=True, hint="; null = the whole batch")
    check_number("rollout_batch_size", rollout_batch_size, 1, allow_none=True, hint="; null = train_batch_size")
    for h_or_w in hw(resolution):
        check_number("resolution", h_or_w, 1)
    check_number("num_inference_steps", num_inference_steps, 2, hint=" (the last step is never trained)")
    check_number("guidance_scale", guidance_scale, 1.0, hint=" (1 = no classifier-free guidance)")
    check_number("max_grad_norm", max_grad_norm, 0, low_open=True, allow_none=True,
                 hint="; null disables gradient clipping")
    check_range_option("adv_clip_range", adv_clip_range, what="; null disables clamping")
    if eval_config.resolution is not None:
        for h_or_w in hw(eval_config.resolution):
            check_number("eval.resolution", h_or_w, 1)
    check_number("eval.num_inference_steps", eval_config.num_inference_steps, 1, allow_none=True)
    check_number("eval.guidance_scale", eval_config.guidance_scale, 1.0, allow_none=True,
                 hint=" (1 = no classifier-free guidance)")


def check_schedule(dynamics, sigmas: torch.Tensor, train_steps: Sequence[int]) -> None:
    """Every step the SDE may take on the loaded policy's schedule must keep a positive coefficient on ``x`` in its
    mean (else a large noise level flips the sample's sign)."""
    if not dynamics.is_stochastic:
        return
    sigmas = sigmas.float().cpu()
    x, zero = torch.ones(1, 1), torch.zeros(1, 1)
    for i in train_steps:
        s, s_next = sigmas[i].item(), sigmas[i + 1].item()
        out = dynamics.step(x, zero, s, s_next, noise=zero)
        if not (torch.isfinite(out.mean).all() and torch.isfinite(out.std).all() and out.mean.item() > 0):
            raise ConfigError(
                f"noise_level={dynamics.noise_level} is too large for dynamics {dynamics.name!r} on this schedule: "
                f"step {i} (sigma {s:.4f} -> {s_next:.4f}) gets a mean coefficient on x of {out.mean.item():.3f} "
                "(it must stay > 0); lower noise_level or use more sampling steps"
            )


def component_config(obj) -> dict | None:
    """A component object as plain config data, ``{class_path, init_args}`` (its ``__init__`` arguments read back
    from its attributes): checkpoints keep hyper-parameters as plain data, so they load with ``weights_only``."""
    if obj is None:
        return None
    cls = type(obj)
    params = [p for p in inspect.signature(cls.__init__).parameters.values()
              if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}",
            "init_args": {p.name: getattr(obj, p.name) for p in params if hasattr(obj, p.name)}}


def plain(value):
    """Config data for hyper-parameters: dataclasses as dicts, components as ``{class_path, init_args}``."""
    from flowrl.dynamics import Dynamics, TrainSteps

    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, (Dynamics, TrainSteps)):
        return component_config(value)
    return value


def check_trainable_dynamics(dynamics, needs_log_prob: bool, trainer_type: str) -> None:
    """A coupled algorithm (``needs_log_prob``) needs stochastic dynamics with a noise level above 0."""
    if needs_log_prob and not dynamics.is_stochastic:
        raise ConfigError(
            f"trainer_type {trainer_type!r} needs a tractable log-prob, which dynamics {dynamics.name!r} does not "
            "give; use Flow-SDE, Dance-SDE or CPS, or a decoupled trainer (nft, awm) for ODE sampling")
    if needs_log_prob and dynamics.noise_level <= 0:
        raise ConfigError(
            f"trainer_type {trainer_type!r} with dynamics {dynamics.name!r} at noise_level {dynamics.noise_level}: "
            "every trained step then has std 0, a constant log-prob and a zero policy gradient (the run would "
            "learn nothing); set noise_level > 0 (e.g. 0.7)")


def rollout_storage(latent_storage_dtype: str, offload_rollout: bool, stores_trajectory: bool, trainer_type: str):
    """The rollout's storage rule (:class:`flowrl.rollout.RolloutStorage`) from the module's memory options. A
    low-precision ``latent_storage_dtype`` is refused where the rollout stores no trajectory (the decoupled
    algorithms keep the final latents only, in float32): there it would do nothing."""
    from flowrl.rollout import RolloutStorage

    storage = RolloutStorage(latent_storage_dtype, offload_rollout)
    if latent_storage_dtype != "float32" and not stores_trajectory:
        raise ConfigError(f"latent_storage_dtype={latent_storage_dtype!r} does nothing for trainer_type "
                          f"{trainer_type!r}: its rollouts store no trajectory (final latents only); remove it "
                          "(float32)")
    return storage
