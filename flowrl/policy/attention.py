"""``policy.attention_backend``: which attention kernel the denoiser runs, through diffusers' attention dispatcher.

diffusers routes the attention of most of its transformers (FLUX, FLUX.2, Qwen-Image, Wan, Z-Image ...) through
``diffusers.models.attention_dispatch.dispatch_attention_fn``; ``ModelMixin.set_attention_backend`` names the kernel
each attention processor asks it for: ``native`` (torch's ``scaled_dot_product_attention``, which picks its own
kernel; the default), ``flash`` (flash-attn 2), ``_flash_3`` (FA3), ``sage``, ``xformers``, ``flex``, the ``*_hub``
kernels, and torch's SDPA kernels one by one (``_native_flash``, ``_native_efficient``, ``_native_cudnn``,
``_native_math``).

A backend is refused in one line, naming the ones this machine has, before the weights load when its package is
missing or it needs a device the machine lacks (flash-attn on a CPU-only host), and at the first denoiser call when
the model sits on a device the backend does not run on. A family whose attention processors call torch's SDPA
directly (SD3's ``JointAttnProcessor2_0``) ignores the dispatcher: a backend other than ``native`` is refused for it
rather than silently doing nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from flowrl.errors import ConfigError

__all__ = ["attention_backends", "available_attention_backends", "check_attention_backend",
           "check_attention_device", "set_attention_backend"]

#: device types each backend computes on; a backend not listed runs on CUDA only
_DEVICES = {"native": None, "_native_math": None, "_native_flash": {"cpu", "cuda"}, "flex": {"cpu", "cuda"},
            "_native_xla": {"xla"}, "_native_npu": {"npu"}}


def attention_backends() -> list[str]:
    """Every backend name diffusers' dispatcher knows."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return [b.value for b in AttentionBackendName]


def _usable(name: str) -> bool:
    """Whether ``name``'s package is installed and this machine has a device it runs on (a Hub kernel also needs
    the Hub: it is downloaded on first use)."""
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
    )

    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except (RuntimeError, ValueError):
        return False
    if name.endswith("_hub"):
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return False
    devices = _DEVICES.get(name, {"cuda"})
    return devices is None or "cpu" in devices or ("cuda" in devices and torch.cuda.is_available())


def available_attention_backends() -> list[str]:
    """The backends that can run on this machine."""
    return [name for name in attention_backends() if _usable(name)]


def check_attention_backend(name: str | None) -> None:
    """Refuses, before any loading, a backend diffusers does not know or this machine cannot run."""
    if name is None:
        return
    if name not in attention_backends():
        raise ConfigError(f"policy.attention_backend={name!r} is not a diffusers attention backend; choose one of "
                          f"{available_attention_backends()} (available here), or null for torch's native SDPA")
    if not _usable(name):
        raise ConfigError(f"policy.attention_backend={name!r} is not available on this machine (its package, its "
                          f"device or, for a Hub kernel, the Hub is missing); available here: "
                          f"{available_attention_backends()}, or null for torch's native SDPA")


def _dispatching_processors(denoiser: nn.Module) -> tuple[list, set[str]]:
    """The attention processors of ``denoiser`` that ask diffusers' dispatcher for a backend, and the class names of
    those that do not."""
    dispatching, direct = [], set()
    for module in denoiser.modules():
        processor = getattr(module, "processor", None)
        if processor is None or not hasattr(module, "set_processor"):
            continue
        if hasattr(processor, "_attention_backend"):
            dispatching.append(processor)
        else:
            direct.add(type(processor).__name__)
    return dispatching, direct


def set_attention_backend(denoiser: nn.Module, name: str | None) -> None:
    """Sets ``name`` on every attention processor of ``denoiser`` (``ModelMixin.set_attention_backend``). That
    method also makes ``name`` the process's default for every other diffusers model; the previous default is put
    back, so only this denoiser (and copies of it, e.g. a distillation teacher) changes."""
    if name is None:
        return
    check_attention_backend(name)
    dispatching, direct = _dispatching_processors(denoiser)
    if not dispatching:
        if name == "native":
            return  # what processors that call torch's SDPA directly do anyway
        raise ConfigError(f"policy.attention_backend={name!r} has no effect on {type(denoiser).__name__}: its "
                          f"attention processors ({', '.join(sorted(direct)) or 'none'}) call torch's SDPA directly, "
                          "not diffusers' dispatcher; set policy.attention_backend: null")
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    from diffusers.utils import logging as diffusers_logging

    previous = _AttentionBackendRegistry.get_active_backend()[0]
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # (it warns that backends are experimental on every call)
    try:
        denoiser.set_attention_backend(name)
    finally:
        diffusers_logging.set_verbosity(verbosity)
        _AttentionBackendRegistry.set_active_backend(previous)


def check_attention_device(name: str | None, device: torch.device) -> None:
    """Refuses a backend on a device it does not run on (checked at the first denoiser call, once the model sits
    where the Trainer put it)."""
    if name is not None and not _runs_on(name, device.type):
        here = [n for n in available_attention_backends() if _runs_on(n, device.type)]
        raise ConfigError(f"policy.attention_backend={name!r} runs on {', '.join(sorted(_DEVICES.get(name, {'cuda'})))}"
                          f" only, but the denoiser is on {device.type}; set policy.attention_backend: null (native "
                          f"SDPA) or one of {here}")


def _runs_on(name: str, device_type: str) -> bool:
    devices = _DEVICES.get(name, {"cuda"})
    return devices is None or device_type in devices
