"""Wan2.2 A14B text-to-video: a ``WanPipeline`` with two experts, as the stock pipeline runs it.

``transformer`` (the high-noise expert) denoises every step whose timestep ``t`` is at least
``boundary_ratio * num_train_timesteps``; ``transformer_2`` (the low-noise expert) the steps below. ``t`` is what
:meth:`WanAdapter.timestep` gives (the scheduler's own timestep of a sampled sigma), so flowrl switches experts at
the very step ``WanPipeline.__call__`` does, with the same comparison (``t >= boundary``). Everything else (text,
latents, frames, sigmas, decoding) is Wan2.1's, see :mod:`flowrl.policy.wan`.

* **One denoiser, two experts.** :class:`WanExperts` holds both transformers as children: it is what
  ``FlowMatchingPolicy`` trains, puts LoRA on (the same targets on each expert), moves, checkpoints, averages (EMA)
  and shards (FSDP2 shards the blocks of both). Its ``forward`` sends every sample to the expert of its noise level,
  so a batch may mix levels (NFT/AWM draw a training time per sample); a batch of one level (every rollout step,
  every GRPO update) calls that expert directly on the whole batch.
* **Guidance per expert.** The stock pipeline's ``guidance_scale_2`` (default: ``guidance_scale``) guides the
  low-noise expert. flowrl's policy passes one scale; :attr:`Wan22Adapter.guidance_scale_2` (None: the same scale,
  the stock default) is the low-noise expert's, applied per sample in :meth:`Wan22Adapter.combine_guidance`.
* **Which trained step hits which expert.** :meth:`Wan22Adapter.expert_of` maps noise levels to experts (0: high
  noise, 1: low noise) and :meth:`Wan22Adapter.expert_steps` a schedule's step indices; the first time a schedule is
  used its split is logged (``steps 0-3 on the high-noise transformer, 4-9 on the low-noise transformer_2``), so
  ``train_steps`` can be chosen to train one expert or both (NFT/AWM: ``timestep_fraction = 1 - boundary_ratio``
  keeps training on the high-noise expert).
* **Export.** ``flowrl export`` writes each expert's LoRA as stock diffusers loads Wan2.2 LoRAs: the high-noise
  expert's ``pytorch_lora_weights.safetensors`` (``load_lora_weights(out)``) and the low-noise expert's
  ``pytorch_lora_weights_transformer_2.safetensors`` (``load_lora_weights(out, weight_name=...,
  load_into_transformer_2=True)``), see :meth:`WanExperts.lora_files`.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from flowrl.errors import ConfigError
from flowrl.policy.adapter import register_adapter
from flowrl.policy.wan import WanAdapter

__all__ = ["EXPERTS", "HIGH_NOISE", "LOW_NOISE", "Wan22Adapter", "WanExperts", "transformer_2_weight_name"]

#: the experts' pipeline attribute names (and child names in :class:`WanExperts`), high-noise first
EXPERTS = ("transformer", "transformer_2")
HIGH_NOISE, LOW_NOISE = 0, 1
#: config entries both experts must share: flowrl lays out latents and text by the first one's
_SHARED_CONFIG = ("patch_size", "in_channels", "out_channels", "text_dim", "rope_max_seq_len")


def transformer_2_weight_name(weight_name: str) -> str:
    """The low-noise expert's LoRA file beside ``weight_name``: ``x.safetensors`` -> ``x_transformer_2.safetensors``."""
    stem, ext = os.path.splitext(weight_name)
    return f"{stem}_{EXPERTS[1]}{ext}"


def _world_size() -> int:
    """Processes in the default group (1 without ``torch.distributed``)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _any_process(flags: list[bool], device: torch.device) -> list[bool]:
    """``flags`` or-ed over all processes (one small all-reduce)."""
    import torch.distributed as dist

    values = torch.tensor([int(f) for f in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


class WanExperts(nn.Module):
    """Wan2.2's high-noise ``transformer`` and low-noise ``transformer_2`` as one denoiser module.

    It offers what flowrl calls on a diffusers transformer, applied to both experts: LoRA (``add_adapter``,
    ``peft_config``, ``disable_adapters`` / ``enable_adapters``, ``fuse_lora``, ``unload_lora``,
    ``load_lora_adapter``), gradient checkpointing, ``config`` (the high-noise expert's; the two share their
    layout), and the block declarations FSDP2 shards by (``_repeated_blocks``)."""

    _no_split_modules = ["WanTransformerBlock"]
    _repeated_blocks = ["WanTransformerBlock"]
    #: kept in float32 under a low-precision frozen base, as diffusers keeps them in WanTransformer3DModel
    _keep_in_fp32_modules = ["rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"]
    _supports_gradient_checkpointing = True

    def __init__(self, transformer: nn.Module, transformer_2: nn.Module):
        super().__init__()
        self.transformer = transformer
        self.transformer_2 = transformer_2

    @property
    def experts(self) -> tuple[nn.Module, nn.Module]:
        return self.transformer, self.transformer_2

    @property
    def config(self):
        return self.transformer.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ LoRA
    def add_adapter(self, adapter_config, adapter_name: str = "default") -> None:
        """The same LoRA (targets, rank, alpha) on each expert, as two independent adapters."""
        targets = adapter_config.target_modules
        named = sorted(t for t in ([targets] if isinstance(targets, str) else targets or [])
                       if t.split(".", 1)[0] in EXPERTS)
        if named:
            raise ConfigError(f"LoRA target_modules {named} name modules of one Wan2.2 expert; targets apply to both "
                              "experts alike: give names within a block, such as attn1.to_q")
        for expert in self.experts:
            expert.add_adapter(copy.deepcopy(adapter_config), adapter_name)

    @property
    def peft_config(self) -> dict:
        """The adapters' configs (the same on both experts): the high-noise expert's ``peft_config``."""
        return getattr(self.transformer, "peft_config", None) or {}

    def _with_lora(self) -> list[nn.Module]:
        return [e for e in self.experts if getattr(e, "peft_config", None)]

    def disable_adapters(self) -> None:
        for expert in self._with_lora():
            expert.disable_adapters()

    def enable_adapters(self) -> None:
        for expert in self._with_lora():
            expert.enable_adapters()

    def fuse_lora(self, **kwargs) -> None:
        for expert in self._with_lora():
            expert.fuse_lora(**kwargs)

    def unload_lora(self) -> None:
        for expert in self._with_lora():
            expert.unload_lora()

    def load_lora_adapter(self, folder: str, weight_name: str | None = None, prefix: str = "transformer",
                          **kwargs) -> None:
        """A Wan2.2 LoRA as ``flowrl export`` writes it: ``weight_name`` (default ``pytorch_lora_weights.safetensors``)
        into the high-noise expert, :func:`transformer_2_weight_name` of it, beside it, into the low-noise one (each
        keyed ``transformer.``, as stock ``WanPipeline.load_lora_weights`` reads either)."""
        from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE

        weight_name = weight_name or LORA_WEIGHT_NAME_SAFE
        second = transformer_2_weight_name(weight_name)
        if not os.path.isfile(os.path.join(folder, second)):
            raise ConfigError(f"Wan2.2 LoRA {os.path.join(folder, weight_name)!r} has no low-noise expert file {second!r} "
                              "beside it; give the folder flowrl export wrote for this two-expert model")
        for expert, name in zip(self.experts, (weight_name, second)):
            expert.load_lora_adapter(folder, weight_name=name, prefix=prefix, **kwargs)

    def lora_files(self) -> list[tuple[str, nn.Module, dict]]:
        """``(file name, expert, extra load_lora_weights arguments)`` of each expert's exported LoRA: the files
        stock ``WanPipeline.load_lora_weights`` reads into ``transformer`` and (``load_into_transformer_2``) into
        ``transformer_2``."""
        from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE

        return [(LORA_WEIGHT_NAME_SAFE, self.transformer, {}),
                (transformer_2_weight_name(LORA_WEIGHT_NAME_SAFE), self.transformer_2,
                 {"weight_name": transformer_2_weight_name(LORA_WEIGHT_NAME_SAFE), "load_into_transformer_2": True})]

    # ------------------------------------------------------------------ gradient checkpointing
    def enable_gradient_checkpointing(self, gradient_checkpointing_func=None) -> None:
        for expert in self.experts:
            expert.enable_gradient_checkpointing(gradient_checkpointing_func)

    def disable_gradient_checkpointing(self) -> None:
        for expert in self.experts:
            expert.disable_gradient_checkpointing()

    @property
    def gradient_checkpointing(self) -> bool:
        return all(e.gradient_checkpointing for e in self.experts)

    @property
    def _gradient_checkpointing_func(self):
        return self.transformer._gradient_checkpointing_func

    @_gradient_checkpointing_func.setter
    def _gradient_checkpointing_func(self, func) -> None:  # the function each expert checkpoints its blocks with
        for expert in self.experts:
            expert._gradient_checkpointing_func = func

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str, subfolder: str | None = None, **kwargs) -> WanExperts:
        """Both experts of a saved two-expert pipeline folder (``transformer/`` and ``transformer_2/``, as ``flowrl
        export`` of a full fine-tune writes it); ``subfolder`` may name the first, as a teacher loader passes it."""
        from diffusers import WanTransformer3DModel

        if subfolder not in (None, EXPERTS[0]) or not all(
                os.path.isfile(os.path.join(path, e, "config.json")) for e in EXPERTS):
            raise ConfigError(f"{path!r} holds no Wan2.2 expert pair; give a pipeline folder with transformer/ and "
                              "transformer_2/ (flowrl export of a full fine-tune of this model)")
        return cls(*(WanTransformer3DModel.from_pretrained(path, subfolder=e, **kwargs) for e in EXPERTS))

    # ------------------------------------------------------------------ the call
    def _experts_to_run(self, local: list[bool], device: torch.device) -> tuple[list[bool], bool]:
        """Which experts run on this process, and whether idle trained experts join the graph with zero gradients.

        * FSDP2 (this module sharded): an expert's blocks are all-gathered (and their gradients reduce-scattered)
          collectively, so every process runs the experts that any process has samples for; one without samples
          runs one sample whose output is dropped.
        * DDP (several processes, not sharded): DDP's reducer waits for a gradient of every trained parameter in
          every synchronised backward; an expert no sample of this batch used gets zero gradients.
        * One process: only the experts that have samples run."""
        from torch.distributed.fsdp import FSDPModule

        if isinstance(self, FSDPModule):
            return _any_process(local, device), False
        return local, _world_size() > 1 and torch.is_grad_enabled()

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                expert: torch.Tensor) -> torch.Tensor:
        """The velocity of each sample by its expert: ``expert`` (B,) holds 0 (``transformer``) or 1
        (``transformer_2``) per sample (:meth:`Wan22Adapter.expert_of`). Returns the prediction tensor."""
        inputs = (hidden_states, timestep, encoder_hidden_states)
        rows = [torch.nonzero(expert == e).flatten() for e in range(len(EXPERTS))]
        local = [len(r) > 0 for r in rows]
        run, zero_grads = self._experts_to_run(local, hidden_states.device)
        parts, order, dropped, idle = [], [], [], []
        for e, model in enumerate(self.experts):  # in this order on every process
            if local[e]:
                whole = len(rows[e]) == len(expert)  # the whole batch on one expert: no gather, no copy
                args = inputs if whole else [x.index_select(0, rows[e].to(x.device)) for x in inputs]
                parts.append(self._call(model, *args))
                order.append(rows[e])
            elif run[e]:  # another process needs this expert: take part in its collectives with one sample
                dropped.append(self._call(model, *(x[:1] for x in inputs))[:0])
            elif zero_grads:
                idle.extend(p for p in model.parameters() if p.requires_grad)
        if len(parts) == 1:
            out = parts[0]
        else:
            out = torch.cat(parts).index_select(0, torch.argsort(torch.cat(order)).to(parts[0].device))
        if idle:  # their sum times 0, as zero rows: a zero gradient for each, the output untouched
            dropped.append((sum(p.sum() for p in idle) * 0).reshape([1] * out.ndim).expand(0, *out.shape[1:]))
        if dropped:
            out = torch.cat([out, *(d.to(out.dtype) for d in dropped)])
        return out

    @staticmethod
    def _call(model: nn.Module, hidden_states, timestep, encoder_hidden_states) -> torch.Tensor:
        return model(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                     return_dict=False)[0]


@register_adapter("WanPipeline", when=lambda p: getattr(p, "transformer_2", None) is not None)
class Wan22Adapter(WanAdapter):
    """Wan2.2 A14B: :class:`WanAdapter` with both experts in one denoiser (see the module docstring).

    Args:
        guidance_scale_2: the low-noise expert's classifier-free guidance scale, as ``WanPipeline.__call__``'s
            ``guidance_scale_2`` (the Wan2.2 T2V A14B card samples with 4.0 / 3.0); None = the scale flowrl samples
            and trains with, the stock default. Settable afterwards as ``policy.adapter.guidance_scale_2``.
    """

    def __init__(self, pipeline, max_sequence_length: int | None = None, num_frames: int | None = None,
                 guidance_scale_2: float | None = None):
        ratio = pipeline.config.get("boundary_ratio")
        if pipeline.transformer is None:
            raise ConfigError("this WanPipeline has a transformer_2 but no transformer (the high-noise expert); "
                              "load both experts of the Wan2.2 model")
        if ratio is None or isinstance(ratio, bool) or not 0 < float(ratio) <= 1:
            raise ConfigError(f"this WanPipeline has two experts but boundary_ratio={ratio!r}; set the pipeline's "
                              "boundary_ratio in (0, 1] (Wan2.2 T2V A14B: 0.875), where the low-noise expert takes over")
        first, second = (getattr(pipeline, e).config for e in EXPERTS)
        differ = [k for k in _SHARED_CONFIG if first.get(k) != second.get(k)]
        if differ:
            raise ConfigError(f"the two Wan2.2 experts differ in {differ}; load the transformer and transformer_2 "
                              "of one model")
        super().__init__(pipeline, max_sequence_length, num_frames)
        self.guidance_scale_2 = guidance_scale_2
        self._denoiser = WanExperts(pipeline.transformer, pipeline.transformer_2)
        #: the experts of the rows of the last ``forward`` (``combine_guidance`` reads it: the call it follows)
        self._last_experts: torch.Tensor | None = None
        self._described: set[tuple[int, int, int]] = set()

    @property
    def denoiser(self) -> WanExperts:
        return self._denoiser

    @property
    def boundary_timestep(self) -> float:
        """``boundary_ratio * num_train_timesteps``: timesteps at or above it go to the high-noise expert."""
        return self.pipeline.config.boundary_ratio * self.pipeline.scheduler.config.num_train_timesteps

    def expert_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """The expert of each noise level ``sigma`` (B,): 0 (``transformer``, high noise) where the denoiser's
        timestep is at least :attr:`boundary_timestep`, else 1 (``transformer_2``), as ``WanPipeline.__call__``
        chooses (int64, on ``sigma``'s device)."""
        t = self.timestep(torch.as_tensor(sigma, dtype=torch.float32).reshape(-1))
        return torch.where(t >= self.boundary_timestep, HIGH_NOISE, LOW_NOISE).to(torch.int64)

    def expert_steps(self, sigmas: torch.Tensor) -> tuple[list[int], list[int]]:
        """Step indices of a schedule (``sigmas``: N + 1 levels, as :meth:`sigmas` returns) on the high-noise and on
        the low-noise expert: step ``i`` goes from ``sigmas[i]`` and is denoised by ``expert_of(sigmas[i])``."""
        experts = self.expert_of(sigmas[:-1]).tolist()
        return ([i for i, e in enumerate(experts) if e == HIGH_NOISE],
                [i for i, e in enumerate(experts) if e == LOW_NOISE])

    def sigmas(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        sigmas = super().sigmas(num_inference_steps, height, width)
        key = (num_inference_steps, height, width)
        if key not in self._described:
            self._described.add(key)
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info(f"[flowrl] Wan2.2 experts, {num_inference_steps} steps at {height}x{width}: "
                           + self.describe_steps(sigmas))
        return sigmas

    def describe_steps(self, sigmas: torch.Tensor) -> str:
        """Which steps of the schedule each expert denoises, in words (logged once per schedule)."""
        def span(steps):
            return "none" if not steps else f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"

        high, low = self.expert_steps(sigmas)
        return (f"steps {span(high)} on the high-noise transformer, {span(low)} on the low-noise transformer_2 "
                f"(boundary timestep {self.boundary_timestep:g}); train_steps picks which of them are trained")

    def forward(self, denoiser, latents, sigma, cond, guidance=None):
        dtype = next(denoiser.parameters()).dtype
        experts = self.expert_of(sigma)
        self._last_experts = experts
        return denoiser(hidden_states=latents.to(dtype), timestep=self.timestep(sigma, latents),
                        encoder_hidden_states=cond["prompt_embeds"].to(dtype), expert=experts)

    def combine_guidance(self, v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
        """``v_u + s * (v_c - v_u)`` with ``s`` the scale of each sample's expert: ``scale`` for the high-noise one,
        :attr:`guidance_scale_2` (when set) for the low-noise one, as the stock pipeline guides them. The experts
        are those of the ``forward`` this combination follows (the policy combines the branches it just
        computed: one batch of both, or the conditional one last, at the same noise levels)."""
        s2 = self.guidance_scale_2
        if s2 is None or s2 == scale:
            return super().combine_guidance(v_uncond, v_cond, scale)
        n, experts = v_cond.shape[0], self._last_experts
        if experts is None or len(experts) not in (n, 2 * n):
            raise RuntimeError("Wan22Adapter.combine_guidance follows the forward of the branches it combines; "
                               f"the last forward had {None if experts is None else len(experts)} rows, not {n}")
        low = (experts[-n:] == LOW_NOISE).to(v_cond.device)
        s = torch.where(low, float(s2), float(scale)).reshape(n, *([1] * (v_cond.ndim - 1))).to(v_cond.dtype)
        return v_uncond + s * (v_cond - v_uncond)
