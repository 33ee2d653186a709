"""``FlowMatchingPolicy``: one diffusers pipeline seen as a trainable velocity field."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from flowrl.conditions import ConditionImages
from flowrl.errors import ConfigError
from flowrl.plugins import model_alias, model_aliases
from flowrl.policy.adapter import Conditioning, adapter_for, component_overrides
from flowrl.policy.attention import check_attention_backend, check_attention_device, set_attention_backend
from flowrl.policy.compile import RegionalCompile, check_compile_mode
from flowrl.policy.prompt_cache import PromptCache
from flowrl.policy.sharding import FullyShard, shard_policy
from flowrl.validation import check_number

FINETUNE_TYPES = ("lora", "full")


def resolve_model_path(name_or_path: str) -> str:
    """A model alias a plugin registered (``flowrl:toy``, :mod:`flowrl.plugins`) becomes its folder; anything else
    is a hub id or a path."""
    return model_alias(name_or_path) or name_or_path


def _is_local_path(name: str) -> bool:
    """A hub id is exactly ``org/name``; anything else (``./x``, ``/x``, ``~/x``, ``a/b/c``, ``x``) is local."""
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or os.path.isdir(name)


@dataclass
class PolicyConfig:
    """How to build the policy: a diffusers pipeline and which of its parameters train.

    Args:
        pretrained_model_name_or_path: a hub id (``stabilityai/stable-diffusion-3.5-medium``), a local folder
            written by ``save_pretrained``, or ``flowrl:toy`` for the shipped toy model.
        finetune_type: ``lora`` (adapters on the transformer, the rest frozen) or ``full`` (the whole transformer).
        lora_rank: rank of the LoRA adapters.
        lora_alpha: LoRA scaling alpha; null = lora_rank (scale 1).
        lora_dropout: dropout on the LoRA path.
        target_modules: module names the adapters wrap; null = the model family's attention and MLP layers.
        max_sequence_length: prompt tokens of the text encoder(s); null = the pipeline's default.
        num_frames: frames of a video model's rollouts; null = the model family's default.
        frozen_dtype: dtype of the frozen weights (VAE, text encoders, the transformer's base under LoRA):
            float32, bfloat16 or float16; trained weights stay float32.
        revision: hub revision (branch, tag or commit) to load.
        variant: weight-file variant to load (e.g. ``fp16``).
        pipeline_class: the diffusers pipeline class to load the model as, where it is not the one its
            ``model_index.json`` names (``WanImageToVideoPipeline`` for Wan2.2 TI2V-5B image-to-video); null = that one.
        gradient_checkpointing: recompute the transformer's activations in the backward pass (less memory).
        uncond_gradient: with classifier-free guidance in training, differentiate the unconditional branch too
            (Flow-GRPO); false treats it as a constant and saves memory.
        prompt_cache_mb: host memory for prompt embeddings kept across iterations (a prompt seen before is not
            encoded again; the text encoders are frozen, so the result is the same); 0 = encode every batch.
        condition_image_area: pixels of a condition image once the family resizes it (editing and image-to-video
            families; aspect ratio kept, sides rounded as the family needs); null = the family's stock
            preprocessing (FLUX.1-Kontext: its preferred resolutions near 1024x1024; Qwen-Image-Edit: 1024x1024).
        fsdp: how FSDP2 shards the denoiser under a sharding strategy (:class:`flowrl.policy.sharding.FullyShard`:
            param_dtype, reduce_dtype, cpu_offload, reshard_after_forward, blocks); null = its defaults there.
            Set under another strategy it is an error (it would do nothing).
        compile: regional ``torch.compile`` of the denoiser's repeated blocks (:mod:`flowrl.policy.compile`):
            ``rollout`` compiles the sampling steps training never recomputes (ODE steps, decoupled rollouts,
            validation, sampling), ``all`` every denoiser call, training included (the calls a ratio compares run
            the training graph in rollout and update alike, so the first update's ratio stays exactly 1); null =
            eager. Compiling takes tens of seconds per graph shape on a CPU.
        attention_backend: the attention kernel through diffusers' attention dispatcher (``native`` SDPA,
            ``flash``, ``_flash_3``, ``sage``, ``xformers``, ``flex``, ... where installed;
            :mod:`flowrl.policy.attention`); one this machine lacks is refused, naming those it has; null = the
            model's default (native SDPA).
    """

    pretrained_model_name_or_path: str
    finetune_type: str = "lora"
    lora_rank: int = 32
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None
    max_sequence_length: int | None = None
    num_frames: int | None = None
    frozen_dtype: str = "float32"
    revision: str | None = None
    variant: str | None = None
    pipeline_class: str | None = None
    gradient_checkpointing: bool = False
    uncond_gradient: bool = True
    prompt_cache_mb: float = 1024.0
    condition_image_area: int | None = None
    fsdp: FullyShard | None = None
    compile: str | None = None
    attention_backend: str | None = None

    def __post_init__(self):
        if isinstance(self.fsdp, dict):
            self.fsdp = FullyShard(**self.fsdp)
        if self.finetune_type not in FINETUNE_TYPES:
            raise ConfigError(f"finetune_type={self.finetune_type!r}; choose one of {FINETUNE_TYPES}")
        if self.finetune_type == "lora" and self.lora_rank < 1:
            raise ConfigError(f"lora_rank must be >= 1, got {self.lora_rank}")
        check_number("policy.lora_alpha", self.lora_alpha, 0, low_open=True, allow_none=True,
                     hint=" (null = lora_rank)")
        check_number("policy.lora_dropout", self.lora_dropout, 0, 1, high_open=True)
        check_number("policy.max_sequence_length", self.max_sequence_length, 1, allow_none=True)
        check_number("policy.num_frames", self.num_frames, 1, allow_none=True, hint=" (video models; null = default)")
        check_number("policy.prompt_cache_mb", self.prompt_cache_mb, 0, hint=" (0 = no cache)")
        check_number("policy.condition_image_area", self.condition_image_area, 256, allow_none=True,
                     hint=" (pixels, e.g. 262144 for 512x512; null = the family's stock size)")
        if self.frozen_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"frozen_dtype={self.frozen_dtype!r}; choose float32, bfloat16 or float16")
        _pipeline_loader(self.pipeline_class)  # a misspelt class fails here, before any loading
        check_compile_mode(self.compile)
        check_attention_backend(self.attention_backend)  # e.g. flash on a CPU-only host, before any loading
        path = resolve_model_path(self.pretrained_model_name_or_path)
        if _is_local_path(path) and not os.path.isdir(os.path.expanduser(path)):
            raise FileNotFoundError(
                f"model path {path!r} does not exist; set policy.pretrained_model_name_or_path to a directory "
                "written by save_pretrained, a hub id such as 'stabilityai/stable-diffusion-3.5-medium', "
                f"or a model alias ({', '.join(model_aliases()) or 'none installed'})"
            )


def _within_block(name: str) -> str:
    """A module name without its block prefix: ``transformer_blocks.3.attn.to_out.0`` -> ``attn.to_out.0``."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[i + 1:])
    return name


@contextlib.contextmanager
def _loading_bars_on_a_terminal_only():
    """diffusers' and transformers' loading progress bars, where output is not a terminal (a log file, a CI log),
    print carriage returns and cursor codes that bury a run's first lines; they are switched off there while a
    pipeline loads, and restored afterwards."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    libraries = [lib for lib in (diffusers_logging, transformers_logging) if lib.is_progress_bar_enabled()]
    quiet = not (sys.stderr is not None and sys.stderr.isatty())
    for lib in libraries if quiet else []:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in libraries if quiet else []:
            lib.enable_progress_bar()


def _pipeline_loader(name: str | None):
    """``DiffusionPipeline`` (the class the model folder names), or the diffusers pipeline class ``name``."""
    import diffusers

    if name is None:
        return diffusers.DiffusionPipeline
    cls = getattr(diffusers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise ConfigError(f"policy.pipeline_class={name!r} is not a diffusers pipeline class; use e.g. "
                          "WanImageToVideoPipeline, or null for the class the model's model_index.json names")
    return cls


def _frozen_component_names(pipeline_class_name: str | None) -> tuple[str, ...]:
    """The components every adapter registered for ``pipeline_class_name`` keeps frozen (a class with variants,
    Wan2.2's two-expert ``WanPipeline``: those all its variants freeze); none for a class without an adapter."""
    from flowrl.policy.adapter import _ADAPTERS

    adapters = [cls for cls, _ in _ADAPTERS.get(pipeline_class_name or "", [])]
    if not adapters:
        return ()
    return tuple(n for n in adapters[0].frozen_components if all(n in a.frozen_components for a in adapters[1:]))


def load_dtypes(config: PolicyConfig, pipeline_class_name: str | None) -> dict[str, torch.dtype] | None:
    """Each component's dtype as it loads (diffusers' per-component ``dtype``), so that no weight passes through
    float32 on its way to ``frozen_dtype``: a bf16 SD3.5-Medium then never holds its 10 GB float32 copy.

    The frozen components load in ``frozen_dtype``; every other module, the denoiser in every supported family, in
    the dtype its base keeps (``frozen_dtype`` under LoRA, float32 when it is fully trained). diffusers keeps a
    family's ``_keep_in_fp32_modules`` in float32 as it loads; :class:`FlowMatchingPolicy` then sets each weight
    to its training dtype exactly as it does to a float32 load, so the weights are the same bit for bit
    (``tests/unit/test_lean_loading.py``). ``None`` (everything float32): the plain call, as before."""
    frozen = getattr(torch, config.frozen_dtype)
    if frozen == torch.float32:
        return None
    base = frozen if config.finetune_type == "lora" else torch.float32
    return {"default": base, **{name: frozen for name in _frozen_component_names(pipeline_class_name)}}


def _load_pipeline(config: PolicyConfig):
    from diffusers import DiffusionPipeline

    path = os.path.expanduser(resolve_model_path(config.pretrained_model_name_or_path))
    kwargs = {"revision": config.revision, "variant": config.variant}
    index = DiffusionPipeline.load_config(path, revision=config.revision)
    dtypes = load_dtypes(config, config.pipeline_class or index.get("_class_name"))
    if dtypes is not None:
        kwargs["dtype"] = dtypes
    # Components saved as null (e.g. an SD3 without T5) must be passed as None explicitly.
    none_components = {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}
    with _loading_bars_on_a_terminal_only():
        # components the stock loader cannot build here (adapter.register_component_loader), built by flowrl
        kwargs.update(component_overrides(index, path, config.revision))
        return _pipeline_loader(config.pipeline_class).from_pretrained(path, **none_components, **kwargs)


class FlowMatchingPolicy(nn.Module):
    """A flow-matching text-to-image (or video) model as an RL policy.

    Holds the trained denoiser (``self.transformer``) and the frozen components (VAE, text
    encoders) as submodules so they move with the Lightning module; the pipeline's scheduler gives
    the sampling noise levels. Only ``trainable_parameters()`` receive gradients.
    """

    def __init__(
        self,
        pipeline,
        finetune_type: str = "lora",
        lora_rank: int = 32,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        target_modules: Sequence[str] | None = None,
        max_sequence_length: int | None = None,
        num_frames: int | None = None,
        frozen_dtype: str = "float32",
        gradient_checkpointing: bool = False,
        uncond_gradient: bool = True,
        prompt_cache_mb: float = 1024.0,
        condition_image_area: int | None = None,
        fsdp: FullyShard | dict | None = None,
        compile: str | None = None,
        attention_backend: str | None = None,
    ):
        super().__init__()
        #: FSDP2 options (``None``: the defaults, used only under a sharding strategy); see :meth:`shard`
        self.fsdp = FullyShard(**fsdp) if isinstance(fsdp, dict) else fsdp
        self.uncond_gradient = uncond_gradient
        if finetune_type not in FINETUNE_TYPES:
            raise ConfigError(f"finetune_type={finetune_type!r}; choose one of {FINETUNE_TYPES}")
        self.adapter = adapter_for(pipeline, max_sequence_length=max_sequence_length, num_frames=num_frames)
        if condition_image_area is not None:
            if self.adapter.condition_images == (0, 0):
                raise ConfigError(f"policy.condition_image_area is set, but {type(pipeline).__name__} takes no "
                                  "condition images; remove it (null) for this model")
            self.adapter.condition_image_area = int(condition_image_area)
        self.pipeline = pipeline
        self.finetune_type = finetune_type
        self.transformer = self.adapter.denoiser
        self.frozen = nn.ModuleDict(
            {n: getattr(pipeline, n) for n in self.adapter.frozen_components if getattr(pipeline, n, None) is not None}
        )
        self.frozen.requires_grad_(False).eval()
        self.frozen_dtype = getattr(torch, frozen_dtype)  # the encoders' (and VAE's) dtype
        self.frozen.to(self.frozen_dtype)
        self.transformer.requires_grad_(finetune_type == "full")
        #: dtype of the denoiser's frozen base weights: ``frozen_dtype`` under LoRA, float32 when fully trained
        self.base_dtype = self.frozen_dtype if finetune_type == "lora" else torch.float32
        if finetune_type == "lora":
            # The frozen base in frozen_dtype (a bf16 SD3.5-M base is 5 GB, not 10), the adapters in float32.
            if any(p.dtype != self.base_dtype for p in self.transformer.parameters()):
                self.transformer.to(self.base_dtype)  # (diffusers warns on every dtype cast, even a no-op one)
            # modules the family keeps in float32 in any dtype (norms, modulation tables), as diffusers loads them
            keep = getattr(self.transformer, "_keep_in_fp32_modules", None) or []
            for name, param in self.transformer.named_parameters():
                if any(k in name for k in keep):
                    param.data = param.data.float()
            self._add_lora(lora_rank, lora_alpha or lora_rank, lora_dropout, target_modules)
            for p in self.transformer.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        if gradient_checkpointing and hasattr(self.transformer, "enable_gradient_checkpointing"):
            self.transformer.enable_gradient_checkpointing()
        self.attention_backend = attention_backend
        set_attention_backend(self.transformer, attention_backend)
        #: the compiled blocks of the denoiser and which calls run them (``policy.compile``), or None
        self.compiled = RegionalCompile(self.transformer, compile) if compile is not None else None
        self._untrained_step = False  # inside a sampling step that training never recomputes (denoising_step)
        self._null_cond: Conditioning | None = None
        self.prompt_cache = PromptCache(prompt_cache_mb)

    def shard(self, mesh) -> None:
        """FSDP2 on ``mesh`` (the strategy's data-parallel mesh): see :mod:`flowrl.policy.sharding`."""
        shard_policy(self, mesh, self.fsdp or FullyShard())

    @classmethod
    def from_config(cls, config: PolicyConfig) -> FlowMatchingPolicy:
        kwargs = asdict(config) | {"fsdp": config.fsdp}
        for key in ("pretrained_model_name_or_path", "revision", "variant", "pipeline_class"):
            kwargs.pop(key)
        return cls(_load_pipeline(config), **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, **kwargs) -> FlowMatchingPolicy:
        return cls.from_config(PolicyConfig(pretrained_model_name_or_path, **kwargs))

    # ------------------------------------------------------------------ parameters
    def _add_lora(self, rank: int, alpha: float, dropout: float, targets: Sequence[str] | None) -> None:
        from peft import LoraConfig

        names = [n for n, _ in self.transformer.named_modules()]
        exists = lambda t: any(n == t or n.endswith("." + t) for n in names)  # noqa: E731
        if targets is None:  # the family's defaults, as far as this (maybe truncated) model has them
            targets = [t for t in self.adapter.default_lora_targets if exists(t)]
        missing = [t for t in targets if not exists(t)]
        if missing:
            linear = sorted({_within_block(n) for n, m in self.transformer.named_modules() if isinstance(m, nn.Linear)})
            raise ConfigError(
                f"LoRA target_modules {missing} match no module of {type(self.transformer).__name__}; "
                f"defaults for this model are {list(self.adapter.default_lora_targets)}; its Linear layers "
                f"are named like {linear[:24]}"
            )
        config = LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), init_lora_weights="gaussian"
        )
        self.transformer.add_adapter(config)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.transformer.parameters() if p.requires_grad)

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    @contextlib.contextmanager
    def adapter_disabled(self):
        """The base model: LoRA switched off (the KL reference without a copy). Full fine-tuning: error."""
        if self.finetune_type != "lora":
            raise RuntimeError("adapter_disabled() needs finetune_type='lora'; full fine-tuning keeps a reference copy")
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()

    def train(self, mode: bool = True):
        """Switches the denoiser only: the frozen parts stay in eval mode (no dropout) and are not walked on every
        switch (a rollout switches twice an iteration; the text encoders and VAE hold most of the modules)."""
        self.training = mode
        self.transformer.train(mode)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    # ------------------------------------------------------------------ model calls
    def encode_prompt(self, prompts: Sequence[str], conditions: Sequence[ConditionImages] | None = None,
                      height: int | None = None, width: int | None = None) -> Conditioning:
        """The conditioning of ``prompts`` (and, for an image-conditioned family, of each one's condition images,
        ``conditions``, generating ``height`` x ``width``), each distinct row encoded once (a group repeats one
        prompt G times: the encoders run on B / G rows, and the rows are shared), and only if :attr:`prompt_cache`
        does not hold it from an earlier batch.

        Each row is encoded on its own: batched, a row's last bits depend on the prompts beside it (the pooled
        CLIP projection differs by an ulp), and a cached row, a fresh one and a resumed run's must agree bit for
        bit. A row with condition images keeps them (``cond["condition"]``, one per sample) and the size
        (``cond["condition_size"]``): the unconditional CFG branch is the negative prompt with the same images."""
        prompts = list(prompts)
        self.check_conditions(conditions, len(prompts))
        if conditions is not None and (height is None or width is None):
            raise ValueError("encode_prompt with condition images needs the height and width being generated")
        keys = prompts if conditions is None else [f"{p}\x00{c.key}\x00{height}x{width}"
                                                   for p, c in zip(prompts, conditions)]
        first = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        rows = []
        for key, i in first.items():
            row = self.prompt_cache.get(key)
            if row is None:
                with torch.no_grad():
                    if conditions is None:
                        row = self.adapter.encode_prompt([prompts[i]], self.device)
                    else:
                        row = self.adapter.encode_condition([prompts[i]], [conditions[i]], height, width, self.device)
                        row.per_sample["condition"] = [conditions[i]]
                        row.shared["condition_size"] = (height, width)
                self.prompt_cache.put(key, row)
            rows.append(row.to(self.device))
        cond = Conditioning.cat(rows)
        if len(first) == len(keys):
            return cond
        index = {k: j for j, k in enumerate(first)}
        return cond.select([index[k] for k in keys])

    def check_conditions(self, conditions: Sequence[ConditionImages] | None, n: int | None = None) -> None:
        """Refuses condition images this family cannot use, or their absence where it needs them, in one line."""
        if conditions is not None and n is not None and len(conditions) != n:
            raise ValueError(f"{len(conditions)} condition entries for {n} prompts")
        self.adapter.check_conditions(conditions)

    def null_condition(self, batch_size: int, cond: Conditioning | None = None) -> Conditioning:
        """Conditioning of the negative prompt, the unconditional branch of classifier-free guidance: the empty
        prompt, or, for samples with condition images (``cond``), the negative prompt with those images."""
        if cond is not None and "condition" in cond:
            height, width = cond["condition_size"]
            return self.encode_prompt([self.adapter.negative_prompt] * len(cond), cond["condition"], height, width)
        if self._null_cond is None or self._null_cond.device != self.device:
            self._null_cond = self.encode_prompt([self.adapter.negative_prompt])
        return self._null_cond.expand(batch_size)

    def check_resolution(self, height: int, width: int) -> None:
        self.adapter.check_resolution(height, width)

    def prepare_latents(self, batch_size: int, height: int, width: int, generator: torch.Generator | None = None):
        shape = (batch_size, *self.adapter.latent_shape(height, width))
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)

    def sigmas(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        return self.adapter.sigmas(num_inference_steps, height, width)

    @contextlib.contextmanager
    def denoising_step(self, trained: bool):
        """The denoiser calls of one sampling step (the sampler enters it): ``trained`` when training recomputes
        the step (a trained SDE step of a coupled rollout). Under ``policy.compile`` the other steps run compiled
        inference graphs, and a trained one runs what the update will run (:mod:`flowrl.policy.compile`)."""
        previous, self._untrained_step = self._untrained_step, not trained
        try:
            yield
        finally:
            self._untrained_step = previous

    def compile_stats(self) -> dict[str, float]:
        """``perf/compiled_graphs``, ``perf/recompiles`` and ``perf/compile_seconds`` under ``policy.compile``;
        empty without it."""
        return {} if self.compiled is None else self.compiled.stats()

    def _denoise(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                 guidance: float | None = None, denoiser: nn.Module | None = None) -> torch.Tensor:
        """The denoiser's raw prediction as float32 (``denoiser``: another module of the same family, e.g. a frozen
        teacher, instead of the policy's), compiled or not as ``policy.compile`` says."""
        denoiser = self.transformer if denoiser is None else denoiser
        if self.attention_backend is not None:
            check_attention_device(self.attention_backend, latents.device)
        if self.compiled is None or denoiser is not self.transformer:
            return self._forward(denoiser, latents, sigma, cond, guidance)
        return self.compiled(lambda: self._forward(denoiser, latents, sigma, cond, guidance), self._untrained_step,
                             latents.shape)

    def _forward(self, denoiser: nn.Module, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                 guidance: float | None) -> torch.Tensor:
        """One call of ``denoiser`` as float32. A low-precision frozen base (LoRA with ``frozen_dtype``) computes
        under autocast in that dtype when no autocast is active (the Trainer's ``precision`` otherwise decides), so
        float32 adapters and activations meet bf16 weights without dtype errors. A fully trained (float32) denoiser
        with bf16 / fp16 encoders and no autocast reads their conditioning as float32, as diffusers' pipelines cast
        the prompt embeddings to the transformer's dtype."""
        device_type = latents.device.type
        if torch.is_autocast_enabled(device_type):
            return self.adapter.forward(denoiser, latents, sigma, cond, guidance).float()
        if self.base_dtype == torch.float32:
            if self.frozen_dtype != torch.float32:
                cond = cond.float()
            return self.adapter.forward(denoiser, latents, sigma, cond, guidance).float()
        with torch.autocast(device_type, dtype=self.base_dtype):
            return self.adapter.forward(denoiser, latents, sigma, cond, guidance).float()

    def velocity(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor | float,
        cond: Conditioning,
        guidance_scale: float = 1.0,
        uncond: Conditioning | None = None,
        uncond_velocity: torch.Tensor | None = None,
        denoiser: nn.Module | None = None,
    ) -> torch.Tensor:
        """Velocity in float32, with classifier-free guidance when ``guidance_scale > 1``.

        With ``uncond_gradient`` (the default) both branches run as one batch and both keep the autograd
        graph: the gradient of the guided velocity, as Flow-GRPO trains it. With ``uncond_gradient=False``
        the unconditional branch runs separately without gradient (less activation memory; the update
        then ignores how the parameters move the unconditional prediction). Sampling and training take
        the same path, so on-policy log-probabilities reproduce exactly either way. ``uncond_velocity``: that
        separate branch's prediction (:meth:`unconditional_velocity`) already computed for these latents with
        these weights, used instead of recomputing it. ``denoiser``: the velocity of another denoiser of this
        family (a frozen teacher) with this policy's encoders, guidance and precision.
        """
        sigma = self._sigma_batch(sigma, latents)
        if self.adapter.guidance_mode == "distilled":  # the scale is an input of the denoiser: one pass
            return self._denoise(latents, sigma, cond, guidance_scale, denoiser)
        if guidance_scale <= 1.0:
            return self._denoise(latents, sigma, cond, denoiser=denoiser)
        n = latents.shape[0]
        uncond = uncond if uncond is not None else self.null_condition(n, cond)
        if self.uncond_gradient:
            both = Conditioning.cat([uncond, cond])
            v_u, v = self._denoise(torch.cat([latents, latents]), torch.cat([sigma, sigma]), both,
                                   denoiser=denoiser).split(n)
        else:
            v = self._denoise(latents, sigma, cond, denoiser=denoiser)
            v_u = (self.unconditional_velocity(latents, sigma, uncond, denoiser) if uncond_velocity is None
                   else uncond_velocity)
        return self.adapter.combine_guidance(v_u, v, guidance_scale)

    @staticmethod
    def _sigma_batch(sigma: torch.Tensor | float, latents: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
        return sigma.expand(latents.shape[0]) if sigma.ndim == 0 else sigma

    @torch.no_grad()
    def unconditional_velocity(self, latents: torch.Tensor, sigma: torch.Tensor | float,
                               uncond: Conditioning | None = None, denoiser: nn.Module | None = None,
                               cond: Conditioning | None = None) -> torch.Tensor:
        """The unconditional CFG branch's raw prediction without gradient, as :meth:`velocity` computes it with
        ``uncond_gradient=False`` (``cond``: the samples' conditioning, whose condition images the branch keeps)."""
        uncond = uncond if uncond is not None else self.null_condition(latents.shape[0], cond)
        return self._denoise(latents, self._sigma_batch(sigma, latents), uncond, denoiser=denoiser)

    @property
    def has_dropout(self) -> bool:
        """Whether the denoiser has an active dropout (its train and eval passes then differ)."""
        return any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.transformer.modules())

    def decode(self, latents: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        """Images (videos) of ``latents``; ``cond``: their conditioning, for a family whose latents leave a given part
        out (:meth:`ModelAdapter.decode_conditioned`)."""
        with torch.no_grad():
            return self.adapter.decode(latents) if cond is None else self.adapter.decode_conditioned(latents, cond)
