"""The boundary between flowrl and one model family.

An adapter knows how a family's pipeline encodes prompts, lays out latents, calls its denoiser and
decodes; everything else (LoRA, trained parameters, guidance, sampling, losses) is shared. Adding a
family (FLUX, Wan, ...) is one file with one ``ModelAdapter`` subclass decorated by
``register_adapter("<PipelineClassName>", ...)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from flowrl.errors import ConfigError

Conditioning = dict[str, torch.Tensor]
"""Per-sample conditioning tensors (batch first), e.g. ``prompt_embeds`` and ``pooled_projections``."""

_ADAPTERS: dict[str, type[ModelAdapter]] = {}


def register_adapter(*pipeline_class_names: str):
    def wrap(cls):
        for name in pipeline_class_names:
            _ADAPTERS[name] = cls
        return cls

    return wrap


def adapter_for(pipeline, max_sequence_length: int | None = None) -> ModelAdapter:
    name = type(pipeline).__name__
    if name not in _ADAPTERS:
        raise ConfigError(
            f"no flowrl adapter for pipeline class {name!r}; supported: {sorted(_ADAPTERS)}. "
            "Add one ModelAdapter subclass decorated with @register_adapter in flowrl/policy/."
        )
    return _ADAPTERS[name](pipeline, max_sequence_length=max_sequence_length)


class ModelAdapter:
    """Family-specific operations. ``denoiser`` is the trained network (transformer)."""

    #: module names in the denoiser that LoRA targets by default (the attention projections).
    default_lora_targets: tuple[str, ...] = ()
    #: pipeline attribute names of the frozen components flowrl keeps (moved with the module).
    frozen_components: tuple[str, ...] = ()

    def __init__(self, pipeline, max_sequence_length: int | None = None):
        self.pipeline = pipeline
        #: text tokens of the long-context encoder (T5); ``None`` means the family's default.
        self.max_sequence_length = max_sequence_length

    @property
    def denoiser(self) -> nn.Module:
        return self.pipeline.transformer

    def encode_prompt(self, prompts: Sequence[str], device: torch.device) -> Conditioning:
        raise NotImplementedError

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one sample's latent (no batch dim) for an image of ``height`` x ``width`` pixels."""
        raise NotImplementedError

    def forward(self, denoiser: nn.Module, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Velocity ``v = eps - x0`` predicted for ``latents`` at noise level ``sigma`` (shape (B,))."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images in [0, 1], float32 ``(B, C, H, W)`` (videos ``(B, T, C, H, W)``)."""
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] to (normalised) latents; used by pretraining-style losses and tests."""
        raise NotImplementedError

    def sigmas(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        """The sampler's noise levels, float32, descending from about 1 to exactly 0 (length N + 1)."""
        raise NotImplementedError

    def check_resolution(self, height: int, width: int) -> None:
        """Raise ``ValueError`` naming the fix if the family cannot generate this size."""
