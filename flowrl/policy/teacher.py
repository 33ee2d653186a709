"""Frozen denoisers of the policy's family from saved weights: a LoRA, an exported model or a flowrl checkpoint
(a distillation teacher; any frozen model the policy's encoders, guidance and precision should drive).

Each becomes a plain module of the policy's denoiser class, no gradients, in eval mode, with its weights merged:

* a **LoRA** (a ``pytorch_lora_weights.safetensors`` file, or a folder holding one, as ``flowrl export`` and
  diffusers' ``save_lora_weights`` write): the policy's base denoiser with the LoRA loaded by diffusers
  (``load_lora_adapter``, the format stock pipelines read) and fused into its weights;
* an **exported model**: a folder with a ``transformer/`` sub-folder (a whole pipeline, ``flowrl export`` of a full
  fine-tune) or a denoiser folder with its ``config.json``, read by the denoiser class's ``from_pretrained``;
* a **flowrl checkpoint** (``.ckpt`` file or sharded checkpoint folder, as ``flowrl fit`` writes): the policy's
  denoiser as constructed (its LoRA setup included) with the checkpoint's trained parameters, LoRA fused.

The copy costs one denoiser's memory per teacher (in the frozen base's dtype); the student's own LoRA, if any,
is not in it.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from flowrl.errors import ConfigError

__all__ = ["frozen_denoiser", "teacher_kind"]

_PREFIX = "policy.transformer."


def teacher_kind(path: str) -> str:
    """``lora``, ``model`` or ``checkpoint`` for the weights at ``path``; a ``ConfigError`` naming the path and the
    forms accepted when it is none of them (checked before any model loads)."""
    from diffusers.loaders.lora_base import (
        LORA_WEIGHT_NAME_SAFE as LORA_WEIGHT_NAME,  # the file LoRAs are saved as
    )

    if not os.path.exists(path):
        raise ConfigError(f"teacher {path!r} does not exist; give a LoRA ({LORA_WEIGHT_NAME} or its folder), an "
                          "exported model folder or a flowrl checkpoint (.ckpt)")
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            return "lora"
        if path.endswith(".ckpt"):
            return "checkpoint"
    else:
        if os.path.isfile(os.path.join(path, LORA_WEIGHT_NAME)):
            return "lora"
        if os.path.isfile(os.path.join(path, "transformer", "config.json")) or \
                os.path.isfile(os.path.join(path, "config.json")):
            return "model"
        if os.path.isfile(os.path.join(path, ".metadata")) or path.rstrip(os.sep).endswith(".ckpt"):
            return "checkpoint"
    raise ConfigError(f"teacher {path!r} is not a LoRA (.safetensors, or a folder with {LORA_WEIGHT_NAME}), an "
                      "exported model (a folder with transformer/config.json or config.json) or a flowrl checkpoint "
                      "(.ckpt)")


def _base_copy(policy) -> nn.Module:
    """The policy's denoiser, copied, with the student's LoRA removed (the base weights only)."""
    denoiser = copy.deepcopy(policy.transformer)
    if getattr(denoiser, "peft_config", None):
        denoiser.unload_lora()  # drops the adapters unmerged: the base model
    return denoiser


def _fuse(denoiser: nn.Module) -> nn.Module:
    if getattr(denoiser, "peft_config", None):
        denoiser.fuse_lora()
        denoiser.unload_lora()
    return denoiser


def _load_lora(policy, path: str) -> nn.Module:
    from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE as LORA_WEIGHT_NAME

    denoiser = _base_copy(policy)
    folder, name = (os.path.dirname(path), os.path.basename(path)) if os.path.isfile(path) else (path, LORA_WEIGHT_NAME)
    dtype = next(denoiser.parameters()).dtype
    if dtype != torch.float32:
        denoiser.float()  # fused in float32, then back to the base's dtype (one rounding, not two)
    try:
        denoiser.load_lora_adapter(folder, weight_name=name, prefix="transformer", adapter_name="teacher")
    except (ValueError, KeyError, RuntimeError) as e:
        raise ConfigError(f"teacher {path!r}: its LoRA does not fit {type(denoiser).__name__} ({e})") from None
    if not getattr(denoiser, "peft_config", None):
        raise ConfigError(f"teacher {path!r}: no LoRA layer of it matches {type(denoiser).__name__} (a LoRA of "
                          "another model family, or keys without the 'transformer.' prefix)")
    denoiser = _fuse(denoiser)
    return denoiser.to(dtype) if dtype != torch.float32 else denoiser  # (diffusers warns on every cast)


def _load_model(policy, path: str) -> nn.Module:
    cls = type(policy.transformer)
    sub = "transformer" if os.path.isfile(os.path.join(path, "transformer", "config.json")) else None
    try:
        denoiser = cls.from_pretrained(path, subfolder=sub)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"teacher {path!r}: {cls.__name__}.from_pretrained failed ({e})") from None
    dtypes = {p.dtype for p in denoiser.parameters()}
    return denoiser if dtypes == {policy.base_dtype} else denoiser.to(policy.base_dtype)


def _load_checkpoint(policy, path: str) -> nn.Module:
    from flowrl.export import read_checkpoint  # (flowrl.export imports the policy package)

    state = {k[len(_PREFIX):]: v for k, v in read_checkpoint(path)["state_dict"].items() if k.startswith(_PREFIX)}
    denoiser = copy.deepcopy(policy.transformer)
    own = dict(denoiser.named_parameters())
    unknown = sorted(k for k in state if k not in own or own[k].shape != state[k].shape)
    trained = {n for n, p in own.items() if p.requires_grad}
    missing = sorted(trained - set(state))
    if unknown or missing or not state:
        raise ConfigError(
            f"teacher {path!r} was not trained with this policy's finetune_type / LoRA setup: "
            + (f"{len(unknown)} of its parameters do not fit (e.g. {unknown[:2]})" if unknown else
               f"it lacks {len(missing)} of the trained parameters (e.g. {missing[:2]})" if missing else
               "it holds no denoiser parameters"))
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
    return _fuse(denoiser)


def frozen_denoiser(policy, path: str) -> nn.Module:
    """A frozen copy of ``policy``'s denoiser carrying the weights at ``path`` (see the module docstring), on the
    policy's device."""
    kind = teacher_kind(path)
    denoiser = {"lora": _load_lora, "model": _load_model, "checkpoint": _load_checkpoint}[kind](policy, path)
    denoiser.requires_grad_(False).eval()
    return denoiser.to(policy.device)
