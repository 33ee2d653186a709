"""The boundary between flowrl and one model family.

An adapter knows how a family's pipeline encodes prompts, lays out latents, calls its denoiser and
decodes; everything else (LoRA, trained parameters, guidance, sampling, losses) is shared. Adding a
family (FLUX, Wan, ...) is one file with one ``ModelAdapter`` subclass decorated by
``register_adapter("<PipelineClassName>", ...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from flowrl.errors import ConfigError

GUIDANCE_MODES = ("cfg", "distilled")

#: diffusers' joint (MMDiT) attention projections of the image and text streams: SD3, FLUX and Qwen-Image name
#: them alike, and LoRA on them is what the papers train by default
JOINT_ATTENTION_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


@dataclass
class Conditioning:
    """What a family's denoiser is conditioned on, for a batch of samples.

    The adapter fills it and reads it (``cond["prompt_embeds"]``); the algorithms and the rollout loop only
    select, expand and concatenate samples, so no family needs a special case outside its adapter file.

    * ``tensors``: batch-first tensors (prompt embeddings, pooled projections, attention masks);
    * ``per_sample``: lists with one entry per sample (e.g. image shapes);
    * ``shared``: the same for every sample (e.g. FLUX's text/image position ids), carried unchanged.
    """

    tensors: dict[str, torch.Tensor]
    per_sample: dict[str, list] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        for t in self.tensors.values():
            return int(t.shape[0])
        for values in self.per_sample.values():
            return len(values)
        raise ValueError("a Conditioning needs at least one per-sample field")

    def __getitem__(self, key: str):
        for part in (self.tensors, self.per_sample, self.shared):
            if key in part:
                return part[key]
        raise KeyError(key)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors or key in self.per_sample or key in self.shared

    def select(self, index: slice | torch.Tensor | Sequence[int]) -> Conditioning:
        """The samples ``index`` (a slice, or integer indices in any order, repeats allowed)."""
        if isinstance(index, slice):
            return Conditioning({k: v[index] for k, v in self.tensors.items()},
                                {k: v[index] for k, v in self.per_sample.items()}, dict(self.shared))
        idx = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        rows = idx.tolist()
        return Conditioning({k: v[idx.to(v.device)] for k, v in self.tensors.items()},
                            {k: [v[i] for i in rows] for k, v in self.per_sample.items()}, dict(self.shared))

    def expand(self, batch_size: int) -> Conditioning:
        """A one-sample conditioning (the empty prompt) as ``batch_size`` samples, without copying tensors."""
        if len(self) != 1:
            raise ValueError(f"expand() takes a one-sample Conditioning, this one has {len(self)}")
        return Conditioning({k: v.expand(batch_size, *v.shape[1:]) for k, v in self.tensors.items()},
                            {k: v * batch_size for k, v in self.per_sample.items()}, dict(self.shared))

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """The samples of ``parts`` one after the other (their ``shared`` fields must agree)."""
        first = parts[0]
        return Conditioning({k: torch.cat([p.tensors[k] for p in parts]) for k in first.tensors},
                            {k: [x for p in parts for x in p.per_sample[k]] for k in first.per_sample},
                            dict(first.shared))

    def to(self, device: torch.device | str) -> Conditioning:
        """The tensors (batch-first, shared, and those held per sample, e.g. condition-image latents) on ``device``."""
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.shared.items()}
        per_sample = {k: [x.to(device) if isinstance(x, torch.Tensor) else x for x in v]
                      for k, v in self.per_sample.items()}
        return Conditioning({k: v.to(device) for k, v in self.tensors.items()}, per_sample, moved)

    def float(self) -> Conditioning:
        """Its floating tensors (batch-first, shared, per sample) in float32, the others as they are: what a float32
        denoiser reads when the encoders that made them run in bf16 / fp16 (``frozen_dtype``). Exact: a bf16 or fp16
        value is a float32 value."""
        def cast(x):
            return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
        return Conditioning({k: cast(v) for k, v in self.tensors.items()},
                            {k: [cast(x) for x in v] for k, v in self.per_sample.items()},
                            {k: cast(v) for k, v in self.shared.items()})

    @property
    def device(self) -> torch.device:
        for t in self.tensors.values():
            return t.device
        return torch.device("cpu")


#: the shift-line constants diffusers' pipelines fall back to when a scheduler config lacks them
_SHIFT_DEFAULTS = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}


def dynamic_shift_mu(scheduler_config, image_seq_len: int) -> float:
    """The resolution-dependent shift ``mu`` of schedulers with ``use_dynamic_shifting`` (SD3.5, FLUX, Qwen):
    linear in the number of image tokens between ``(base_image_seq_len, base_shift)`` and
    ``(max_image_seq_len, max_shift)``, as diffusers' pipelines compute it (with their defaults for missing keys)."""
    cfg = {k: scheduler_config.get(k, v) for k, v in _SHIFT_DEFAULTS.items()}
    m = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_image_seq_len"] - cfg["base_image_seq_len"])
    return image_seq_len * m + cfg["base_shift"] - m * cfg["base_image_seq_len"]


def vae_decode_scaled(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents normalised by the VAE's ``scaling_factor`` / ``shift_factor`` (SD3, FLUX) to images in [0, 1]."""
    z = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    images = vae.decode(z, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def vae_encode_scaled(vae, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] to latents normalised as :func:`vae_decode_scaled` expects them (float32)."""
    z = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist.sample()
    return ((z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor).float()


def vae_latent_stats(vae_config, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Wan-style VAE's ``latents_mean`` and ``1 / latents_std``, shaped (1, z_dim, 1, 1, 1) as the stock Wan and
    Qwen-Image pipelines build them (normalised latents are ``(z - mean) * inv_std``)."""
    mean = torch.tensor(vae_config.latents_mean).view(1, vae_config.z_dim, 1, 1, 1).to(like.device, like.dtype)
    inv_std = 1.0 / torch.tensor(vae_config.latents_std).view(1, vae_config.z_dim, 1, 1, 1).to(like.device, like.dtype)
    return mean, inv_std


def scheduler_sigmas(scheduler, num_inference_steps: int, image_seq_len: int) -> torch.Tensor:
    """``scheduler``'s sigmas for ``num_inference_steps`` (float32, CPU, N + 1 values ending in 0), with the
    dynamic shift for ``image_seq_len`` image tokens where the scheduler uses one."""
    if scheduler.config.get("use_dynamic_shifting", False):
        scheduler.set_timesteps(num_inference_steps, mu=dynamic_shift_mu(scheduler.config, image_seq_len))
    else:
        scheduler.set_timesteps(num_inference_steps)
    return scheduler.sigmas.detach().to("cpu", torch.float32).clone()

#: pipeline class name -> the adapters registered for it, in the order tried (variants with a ``when`` first)
_ADAPTERS: dict[str, list[tuple[type[ModelAdapter], Callable | None]]] = {}


#: loaders of pipeline components flowrl loads itself, keyed by their model_index.json entry (library, class)
_COMPONENT_LOADERS: dict[tuple[str, str], Callable] = {}


def register_component_loader(library: str, class_name: str):
    """Registers ``loader(path, subfolder, revision) -> component | None`` for the pipeline components that
    model_index.json names ``[library, class_name]``: where it returns a component, the pipeline is loaded with it
    (``from_pretrained(path, <name>=component)``); None leaves that component to diffusers' own loader. For a
    component the stock loader cannot build in flowrl's environment (Qwen-Image-Edit's processor without
    torchvision)."""

    def wrap(loader):
        _COMPONENT_LOADERS[(library, class_name)] = loader
        return loader

    return wrap


def component_overrides(index: dict, path: str, revision: str | None) -> dict:
    """The components of the pipeline at ``path`` (its model_index.json, ``index``) that a registered loader
    builds, by name."""
    overrides = {}
    for name, entry in index.items():
        loader = _COMPONENT_LOADERS.get(tuple(entry)) if isinstance(entry, list) and len(entry) == 2 else None
        component = loader(path, name, revision) if loader is not None else None
        if component is not None:
            overrides[name] = component
    return overrides


def register_adapter(*pipeline_class_names: str, when: Callable | None = None):
    """Registers a ``ModelAdapter`` subclass for pipelines of these class names. ``when(pipeline) -> bool``: only
    for the pipelines it accepts, a variant of a class another adapter takes too (Wan2.2's two-expert
    ``WanPipeline``); adapters with a ``when`` are tried before the plain one."""

    def wrap(cls):
        for name in pipeline_class_names:
            entries = [e for e in _ADAPTERS.get(name, []) if e[0].__qualname__ != cls.__qualname__]
            entries.append((cls, when))
            _ADAPTERS[name] = sorted(entries, key=lambda e: e[1] is None)
        return cls

    return wrap


def adapter_for(pipeline, max_sequence_length: int | None = None, num_frames: int | None = None) -> ModelAdapter:
    name = type(pipeline).__name__
    if name not in _ADAPTERS:
        raise ConfigError(
            f"no flowrl adapter for pipeline class {name!r}; supported: {sorted(_ADAPTERS)}. "
            "Add one ModelAdapter subclass decorated with @register_adapter in flowrl/policy/."
        )
    cls = next((c for c, when in _ADAPTERS[name] if when is None or when(pipeline)), _ADAPTERS[name][-1][0])
    if not cls.is_video:  # image families keep their two-argument constructor
        if num_frames is not None:
            raise ConfigError(
                f"policy.num_frames={num_frames} is set, but {name} generates images, not videos; "
                "remove num_frames (null) for this model"
            )
        return cls(pipeline, max_sequence_length=max_sequence_length)
    return cls(pipeline, max_sequence_length=max_sequence_length, num_frames=num_frames)


class ModelAdapter:
    """Family-specific operations. ``denoiser`` is the trained network (transformer)."""

    #: module names in the denoiser that LoRA targets by default (the attention projections).
    default_lora_targets: tuple[str, ...] = ()
    #: pipeline attribute names of the frozen components flowrl keeps (moved with the module).
    frozen_components: tuple[str, ...] = ()
    #: how guidance works: ``cfg`` (true classifier-free guidance against the empty prompt, two branches) or
    #: ``distilled`` (the guidance scale is an input of the denoiser, one pass: FLUX.1-dev)
    guidance_mode: str = "cfg"
    #: the prompt of the unconditional CFG branch
    negative_prompt: str = ""
    #: a video family: latents have a frame axis and the constructor takes ``num_frames``
    is_video: bool = False
    #: how many condition images one sample takes, ``(fewest, most)``: ``(0, 0)`` for a text-to-image or
    #: text-to-video family, ``(1, 1)`` for image-to-video, ``(0, 1)`` for a model that edits or generates
    condition_images: tuple[int, int] = (0, 0)
    #: pixels of a condition image after the family's resize (``policy.condition_image_area``); None = the stock
    #: pipeline's own preprocessing
    condition_image_area: int | None = None

    def __init__(self, pipeline, max_sequence_length: int | None = None, num_frames: int | None = None):
        self.pipeline = pipeline
        #: text tokens of the long-context encoder (T5); ``None`` means the family's default.
        self.max_sequence_length = max_sequence_length
        #: frames per generated video (video families); ``None`` means the family's default.
        self.num_frames = num_frames

    @property
    def denoiser(self) -> nn.Module:
        return self.pipeline.transformer

    def encode_prompt(self, prompts: Sequence[str], device: torch.device) -> Conditioning:
        raise NotImplementedError

    def encode_condition(self, prompts: Sequence[str], conditions: Sequence, height: int, width: int,
                         device: torch.device) -> Conditioning:
        """The conditioning of ``prompts`` each with its condition images (an image-conditioned family):
        ``conditions`` has one :class:`flowrl.conditions.ConditionImages` per prompt (float32 ``(3, H, W)`` tensors
        in [0, 1] at their own sizes, to be resized and encoded as the stock pipeline does for an output of
        ``height`` x ``width``). What it returns, ``forward`` reads (image tokens, image latents, masks). The same
        inputs must give the same bits (the rows are cached and re-encoded for the unconditional branch)."""
        raise NotImplementedError(f"{type(self).__name__} takes no condition images")

    def check_conditions(self, conditions: Sequence | None) -> None:
        """Refuses condition images this family cannot use, or their absence where it needs them, in one line."""
        low, high = self.condition_images
        family = type(self.pipeline).__name__
        if conditions is None:
            if low > 0:
                raise ConfigError(f"{family} generates from condition images, and none were given; give prompt files "
                                  'whose rows name them ({"prompt": ..., "images": ["a.png"]}), or flowrl sample '
                                  "--images")
            return
        if high == 0:
            raise ConfigError(f"{family} takes no condition images, but the prompts name some; use a prompt file "
                              "without images, or an editing / image-to-video model")
        for c in conditions:  # ConditionImages, or a row's tuple of image paths
            if not low <= len(c) <= high:
                sources = getattr(c, "sources", None) or [x for x in c if isinstance(x, str)]
                where = f" ({', '.join(sources)})" if sources else ""
                allowed = str(low) if low == high else f"{low} to {high}"
                raise ConfigError(f"a sample has {len(c)} condition images{where}; {family} takes {allowed} per "
                                  "sample")

    def stock_condition_kwargs(self, condition, height: int, width: int) -> dict:
        """The stock pipeline's ``__call__`` arguments that hand it ``condition``'s images as :meth:`encode_condition`
        sees them (``flowrl sample`` draws edits with the stock call): ``image=`` one PIL image, or a list of them."""
        from flowrl.conditions import to_pil_image

        images = [to_pil_image(im) for im in condition]
        return {"image": images[0] if len(images) == 1 else images}

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one sample's latent (no batch dim) for an image of ``height`` x ``width`` pixels."""
        raise NotImplementedError

    def forward(self, denoiser: nn.Module, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                guidance: float | None = None) -> torch.Tensor:
        """Velocity ``v = eps - x0`` predicted for ``latents`` at noise level ``sigma`` (shape (B,)).
        ``guidance`` is the scale of a ``distilled`` family (None for ``cfg`` families)."""
        raise NotImplementedError

    def combine_guidance(self, v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
        """True CFG: ``v_u + scale * (v_c - v_u)`` (float32). A family may rescale it (Qwen-Image's norm rescale)."""
        return v_uncond + scale * (v_cond - v_uncond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images in [0, 1], float32 ``(B, C, H, W)`` (videos ``(B, T, C, H, W)``)."""
        raise NotImplementedError

    def decode_conditioned(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """:meth:`decode` of the samples of ``cond``: a family whose latents leave out a given part keeps it in the
        conditioning and puts it back here (Wan2.2 TI2V's first frame); the default ignores ``cond``."""
        return self.decode(latents)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] to (normalised) latents; used by pretraining-style losses and tests."""
        raise NotImplementedError

    def sigmas(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        """The sampler's noise levels, float32, descending from about 1 to exactly 0 (length N + 1)."""
        raise NotImplementedError

    def check_resolution(self, height: int, width: int) -> None:
        """Raise ``ValueError`` naming the fix if the family cannot generate this size."""


class PackedLatentsAdapter(ModelAdapter):
    """A family whose transformer reads latents packed in 2x2 patches (FLUX, Qwen-Image): flowrl keeps them
    unpacked, ``(B, C, H/f, W/f)``, and packs inside ``forward`` with the stock pipeline's own ``_pack_latents``
    / ``_unpack_latents`` (a permutation, so sampling is the stock pipeline's exactly)."""

    #: the family's name in messages
    family_name: str = ""

    @property
    def vae_scale_factor(self) -> int:
        raise NotImplementedError

    def check_resolution(self, height: int, width: int) -> None:
        multiple = self.vae_scale_factor * 2  # the VAE's downsampling x the 2x2 latent packing
        if height < multiple or width < multiple or height % multiple or width % multiple:
            low_h, low_w = (max(multiple, v // multiple * multiple) for v in (height, width))
            raise ConfigError(
                f"resolution {height}x{width}: {self.family_name} needs height and width that are positive multiples "
                f"of {multiple} (VAE factor {self.vae_scale_factor} x 2x2 latent packing; the stock pipeline would "
                f"silently resize); set resolution (and eval.resolution) to e.g. [{low_h}, {low_w}]"
            )

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return (self.pipeline.transformer.config.in_channels // 4, height // f, width // f)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` (or a video VAE's ``(B, C, 1, H, W)``) -> the transformer's ``(B, H/2 * W/2, 4C)``."""
        b, c, h, w = latents.shape[0], latents.shape[1], latents.shape[-2], latents.shape[-1]
        return self.pipeline._pack_latents(latents, b, c, h, w)

    def unpack(self, packed: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
        f = self.vae_scale_factor
        return self.pipeline._unpack_latents(packed, latent_height * f, latent_width * f, f)

    #: the stock pipeline lets a scheduler with ``use_flow_sigmas`` choose its own sigmas (FLUX's does)
    honours_use_flow_sigmas: bool = False

    def sigmas(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        """What the stock pipeline's ``__call__`` sets: ``linspace(1, 1/N, N)`` shifted by ``mu`` of the packed image
        token count (the scheduler applies any ``shift_terminal``), then 0 appended (float32)."""
        scheduler = self.pipeline.scheduler
        f = self.vae_scale_factor * 2
        mu = dynamic_shift_mu(scheduler.config, (height // f) * (width // f))
        n = num_inference_steps
        if self.honours_use_flow_sigmas and scheduler.config.get("use_flow_sigmas", False):
            scheduler.set_timesteps(n, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
        return scheduler.sigmas.detach().to("cpu", torch.float32).clone()


def conditioning_kwargs(pipeline, adapter=None) -> dict:
    """The ``pipeline(...)`` arguments that make its text context (T5 tokens) and frame count the ones flowrl
    trains with: an SD3 without T5 trains on 0 T5 tokens, where the stock call pads 256 zero tokens."""
    import inspect

    adapter = adapter or adapter_for(pipeline)
    accepted = inspect.signature(type(pipeline).__call__).parameters
    values = {"max_sequence_length": adapter.max_sequence_length, "num_frames": adapter.num_frames}
    return {k: v for k, v in values.items() if v is not None and k in accepted}
