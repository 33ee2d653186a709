"""``flowrl export``: a trained policy in the formats stock diffusers reads.

* ``finetune_type: lora``: the transformer's LoRA, written by the pipeline class's own ``save_lora_weights``
  (``pytorch_lora_weights.safetensors``), so that ``<PipelineClass>.from_pretrained(base).load_lora_weights(out)``
  gives the trained velocity. The peft ``LoraConfig`` (rank, ``lora_alpha``, target modules) travels as
  diffusers' LoRA adapter metadata in the safetensors header; a loader mixin without a metadata argument
  gets the ``lora_alpha / r`` scale folded into ``lora_B`` instead (diffusers then loads with scale 1). A denoiser
  of several parts (Wan2.2's two experts) lists one file per part (``lora_files()``), each with the
  ``load_lora_weights`` arguments that load it (recorded under ``lora_files``).
* ``finetune_type: full``: a complete pipeline folder (``save_pretrained``) with the trained transformer and
  the frozen components as the policy holds them, read by ``DiffusionPipeline.from_pretrained(out)``.

Either way ``flowrl_export.json`` records the base model, the LoRA setup, the trainer type and the checkpoint.

``export_checkpoint`` rebuilds the module from the run's config as ``flowrl fit`` does (``flowrl.cli.main`` with
``run=False``), loads the checkpoint's trained parameters and calls ``export_policy``::

    flowrl export --ckpt_path runs/x/checkpoints/last.ckpt --config runs/x/config.yaml --out exported/
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import yaml

from callbacks.fsdp2 import read_whole_checkpoint
from flowrl.checkpoint import check_checkpoint_files
from flowrl.errors import ConfigError

__all__ = ["EXPORT_INFO", "export_checkpoint", "export_main", "export_policy", "load_checkpoint_module",
           "load_trained_parameters", "read_checkpoint"]

#: the small description written next to the exported weights
EXPORT_INFO = "flowrl_export.json"
#: top-level keys of a config saved by ``flowrl fit`` that belong to ``Trainer.fit``, not to the classes built
_FIT_ONLY_KEYS = ("ckpt_path", "weights_only")
#: the Trainer only has to be constructible on the machine that exports (the module is built on the CPU)
_TRAINER_OVERRIDES = ("--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=1",
                      "--trainer.strategy=auto", "--trainer.logger=false")
_OVERRIDE_PREFIXES = ("--model", "--data", "--trainer", "--seed_everything", "--optimizer", "--lr_scheduler")


# ---------------------------------------------------------------------------------------------- export_policy
def _check_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> None:
    if os.path.isfile(out_dir):
        raise ConfigError(f"--out {os.fspath(out_dir)!r} is a file; give a directory to export into")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ConfigError(f"--out {os.fspath(out_dir)!r} is not empty; choose a new directory or pass --overwrite")


def _null_components(out_dir: str) -> list[str]:
    """Components saved as ``null`` in ``model_index.json`` (an SD3 without T5): stock ``from_pretrained`` needs
    them passed as ``None`` (``DiffusionPipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)``)."""
    path = os.path.join(out_dir, "model_index.json")
    if not os.path.isfile(path):
        return []
    index = json.load(open(path, encoding="utf-8"))
    return sorted(k for k, v in index.items() if isinstance(v, list) and v == [None, None])


def _lora_adapter_name(transformer) -> str:
    names = list(getattr(transformer, "peft_config", {}) or {})
    if not names:
        raise ConfigError("finetune_type is lora but the transformer has no LoRA adapter to export")
    return "default" if "default" in names else names[0]


def _save_lora(policy, out_dir: str) -> dict[str, Any]:
    from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
    from peft import get_peft_model_state_dict

    pipeline, transformer = policy.pipeline, policy.transformer
    cls = type(pipeline)
    save = getattr(cls, "save_lora_weights", None)
    params = inspect.signature(save).parameters if save is not None else {}
    if "transformer_lora_layers" not in params:
        raise ConfigError(
            f"{cls.__name__} has no save_lora_weights(transformer_lora_layers=...) (its diffusers loader mixin "
            "cannot load a transformer LoRA); train with finetune_type: full to export a whole pipeline"
        )
    name = _lora_adapter_name(transformer)
    config = transformer.peft_config[name]
    # one file per part carrying LoRA: the transformer, or each expert of a denoiser that lists them (Wan2.2)
    files = (transformer.lora_files() if hasattr(transformer, "lora_files")
             else [(LORA_WEIGHT_NAME_SAFE, transformer, {})])
    kwargs: dict[str, Any] = {}
    fold = None
    if "transformer_lora_adapter_metadata" in params:
        # diffusers rebuilds LoraConfig(**metadata) on load: the same r, lora_alpha, targets, rank/alpha patterns
        kwargs["transformer_lora_adapter_metadata"] = config.to_dict()
        alpha_in = "metadata"
    else:
        # No metadata: diffusers loads with lora_alpha = r (scale 1), so B carries peft's alpha / r scale.
        if config.rank_pattern or config.alpha_pattern:
            raise ConfigError(f"{cls.__name__}.save_lora_weights stores no LoRA metadata; per-layer rank/alpha "
                              "patterns cannot be folded into the weights")
        fold = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        alpha_in = "folded_into_lora_B"
    for weight_name, part, _ in files:
        layers = {k: v.detach().to("cpu").contiguous() for k, v in
                  get_peft_model_state_dict(part, adapter_name=name).items()}
        if fold is not None:
            layers = {k: v * fold if ".lora_B." in k else v for k, v in layers.items()}
        named = {} if weight_name == LORA_WEIGHT_NAME_SAFE else {"weight_name": weight_name}  # (the default name)
        save(out_dir, transformer_lora_layers=layers, safe_serialization=True, **named, **kwargs)
    calls = [f"load_lora_weights(<this directory>{''.join(f', {k}={v!r}' for k, v in extra.items())})"
             for _, _, extra in files]
    load_with = (f"{cls.__name__}.from_pretrained(base_model).{calls[0]}" if len(calls) == 1 else
                 f"pipe = {cls.__name__}.from_pretrained(base_model); " + "; ".join(f"pipe.{c}" for c in calls))
    return {
        "lora_rank": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_scale": config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r),
        "lora_alpha_stored_in": alpha_in,
        "target_modules": sorted(config.target_modules) if not isinstance(config.target_modules, str)
        else config.target_modules,
        "weight_name": files[0][0],
        "lora_files": [{"weight_name": w, "load_lora_weights_kwargs": extra} for w, _, extra in files],
        "load_with": load_with,
    }


def _save_full(policy, out_dir: str) -> dict[str, Any]:
    if getattr(policy.transformer, "peft_config", None):
        raise ConfigError("finetune_type is full but the transformer carries LoRA layers; nothing to export as is")
    policy.pipeline.save_pretrained(out_dir, safe_serialization=True)
    nulls = _null_components(out_dir)
    return {
        "null_components": nulls,
        "load_with": "DiffusionPipeline.from_pretrained(<this directory>"
        + "".join(f", {n}=None" for n in nulls) + ")",
    }


def _call_kwargs(pipeline, adapter) -> dict:
    from flowrl.policy.adapter import conditioning_kwargs

    return conditioning_kwargs(pipeline, adapter)


def export_policy(policy, out_dir: str | os.PathLike, *, trainer_type: str | None = None,
                  extra: dict[str, Any] | None = None, overwrite: bool = False) -> str:
    """Write ``policy`` (a :class:`flowrl.policy.FlowMatchingPolicy`) to ``out_dir`` in stock diffusers form:
    its LoRA (``finetune_type: lora``) or a whole pipeline folder (``full``), plus ``flowrl_export.json``.
    Returns ``out_dir``."""
    out_dir = os.fspath(out_dir)
    _check_out_dir(out_dir, overwrite)
    os.makedirs(out_dir, exist_ok=True)
    pipeline = policy.pipeline
    info: dict[str, Any] = {
        "format": "diffusers_lora" if policy.finetune_type == "lora" else "diffusers_pipeline",
        "finetune_type": policy.finetune_type,
        "pipeline_class": type(pipeline).__name__,
        "base_model": getattr(pipeline, "name_or_path", None),
        "trainer_type": trainer_type,
        # what pipeline(...) needs to condition as flowrl trained (an SD3 without T5: max_sequence_length 0)
        "call_kwargs": _call_kwargs(pipeline, policy.adapter),
    }
    if policy.finetune_type == "lora":
        info.update(_save_lora(policy, out_dir))
    else:
        info.update(_save_full(policy, out_dir))
    info.update(extra or {})
    with open(os.path.join(out_dir, EXPORT_INFO), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    return out_dir


# ----------------------------------------------------------------------------------------- export_checkpoint
def read_checkpoint(ckpt_path: str | os.PathLike) -> dict:
    path = os.fspath(ckpt_path)
    if not os.path.exists(path):
        raise ConfigError(f"checkpoint {path!r} does not exist")
    check_checkpoint_files(path)
    try:
        checkpoint = read_whole_checkpoint(path) if os.path.isdir(path) else torch.load(
            path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same mistake for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"{path!r} is not a readable checkpoint ({type(e).__name__}: {first[:200]})") from e
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ConfigError(f"{path!r} holds no Lightning checkpoint (no 'state_dict'); give a .ckpt of flowrl fit")
    return checkpoint


def _config_arg(config: str | os.PathLike) -> str:
    """A ``--config`` value for ``main(run=False)``: a config saved by ``flowrl fit`` (``config.yaml`` in the log
    directory) also holds ``Trainer.fit``'s arguments (``ckpt_path``), which are dropped here."""
    config = os.fspath(config)
    is_file = os.path.isfile(config)
    if not is_file and "\n" not in config and ":" not in config:
        raise ConfigError(f"config {config!r} does not exist")
    text = open(config, encoding="utf-8").read() if is_file else config
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return config  # jsonargparse reports it
    if isinstance(data, dict) and any(k in data for k in _FIT_ONLY_KEYS):
        kept = {k: v for k, v in data.items() if k not in _FIT_ONLY_KEYS}
        if is_file and "base" in kept:  # inline YAML has no directory: the base's path relative to the file
            kept["base"] = os.path.abspath(os.path.join(os.path.dirname(config), str(kept["base"])))
        return yaml.safe_dump(kept, sort_keys=False)
    return config


def build_module(configs: Sequence[str | os.PathLike], overrides: Sequence[str] = ()):
    """The LightningModule ``flowrl fit --config ... <overrides>`` would train (built on the CPU, not run)."""
    from flowrl.fit import fit_main as main

    args = [a for c in configs for a in ("--config", _config_arg(c))]
    cli = main([*args, *_TRAINER_OVERRIDES, *overrides], run=False)
    return cli.model


def _ema_state(checkpoint: dict) -> dict[str, torch.Tensor]:
    states = [s for s in (checkpoint.get("callbacks") or {}).values()
              if isinstance(s, dict) and isinstance(s.get("ema"), dict) and "config" in s]
    if len(states) != 1:
        raise ConfigError("--ema: the checkpoint holds " + ("no EMA state (train with the callbacks.EMA callback, "
                          "or export the live weights without --ema)" if not states else
                          f"{len(states)} EMA states; export the live weights without --ema"))
    if not states[0]["ema"]:
        raise ConfigError("--ema: the checkpoint's EMA state is empty (EMA was disabled in that run)")
    return states[0]["ema"]


def load_trained_parameters(module, checkpoint: dict, state: dict[str, torch.Tensor] | None = None,
                            source: str = "the checkpoint") -> None:
    """Load a flowrl checkpoint's trained parameters (``state``, default its ``state_dict``) into ``module``
    the way Lightning does (``on_load_checkpoint``, then ``load_state_dict`` with ``strict_loading=False``),
    after checking that they are exactly the parameters ``module`` trains, with the same shapes."""
    state = checkpoint["state_dict"] if state is None else state
    trained = {n: p for n, p in module.named_parameters() if p.requires_grad}
    missing = sorted(set(trained) - set(state))
    unexpected = sorted(set(state) - set(trained))
    reshaped = [f"{n}: {tuple(state[n].shape)} in the checkpoint, {tuple(p.shape)} in the config"
                for n, p in trained.items() if n in state and tuple(state[n].shape) != tuple(p.shape)]
    if missing or unexpected or reshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} trained parameters are not in it (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} of its parameters are not trained by the config (e.g. {unexpected[0]})")
        if reshaped:
            parts.append(f"{len(reshaped)} have another shape (e.g. {reshaped[0]})")
        raise ConfigError(f"{source} does not match the config: " + "; ".join(parts) + ". Export with the config "
                          "the run was trained with (its config.yaml) and the same finetune_type / LoRA options")
    try:
        module.on_load_checkpoint(checkpoint)
    except KeyError as e:
        raise ConfigError(f"{source} does not match the config: {e.args[0] if e.args else e}") from e
    result = module.load_state_dict(state, strict=False)
    if result.unexpected_keys:  # checked above; load_state_dict's own view must agree
        raise ConfigError(f"{source} does not match the config: unexpected {result.unexpected_keys[:3]}")


def load_checkpoint_module(ckpt_path: str | os.PathLike, config: str | os.PathLike | Sequence[str | os.PathLike], *,
                           overrides: Sequence[str] = (), ema: bool = False):
    """``(module, checkpoint)``: the module built from the run's ``config`` as ``flowrl fit`` built it, with the
    checkpoint's trained parameters (the EMA average with ``ema``) loaded, in eval mode."""
    configs = [config] if isinstance(config, (str, os.PathLike)) else list(config)
    if not configs:
        raise ConfigError("give the run's config (--config), so the model is built as flowrl fit built it")
    checkpoint = read_checkpoint(ckpt_path)
    state = _ema_state(checkpoint) if ema else None
    module = build_module(configs, overrides)
    load_trained_parameters(module, checkpoint, state, source=f"checkpoint {os.fspath(ckpt_path)!r}")
    return module.eval(), checkpoint


def export_checkpoint(ckpt_path: str | os.PathLike, config: str | os.PathLike | Sequence[str | os.PathLike],
                      out_dir: str | os.PathLike, *, overrides: Sequence[str] = (), ema: bool = False,
                      overwrite: bool = False) -> str:
    """Export a ``flowrl fit`` checkpoint: build the module from ``config`` (one or several ``--config`` files of
    the run, e.g. its saved ``config.yaml``, plus command-line ``overrides``), load the checkpoint's trained
    parameters (the EMA average with ``ema``) and call :func:`export_policy`. Returns ``out_dir``."""
    _check_out_dir(out_dir, overwrite)
    module, checkpoint = load_checkpoint_module(ckpt_path, config, overrides=overrides, ema=ema)
    policy_hp = dict(module.hparams.get("policy") or {}) if hasattr(module, "hparams") else {}
    extra = {
        "pretrained_model_name_or_path": policy_hp.get("pretrained_model_name_or_path"),
        "revision": policy_hp.get("revision"),
        "variant": policy_hp.get("variant"),
        "checkpoint": os.path.abspath(os.fspath(ckpt_path)),
        "global_step": checkpoint.get("global_step"),
        "iteration": checkpoint.get("flowrl_iteration"),
        "weights": "ema" if ema else "live",
        "sampling": module.validation_sampling(),  # flowrl sample's defaults for this export
        "condition_image_area": module.policy.adapter.condition_image_area,  # an editing model's condition size
    }
    return export_policy(module.policy, out_dir, trainer_type=getattr(module, "trainer_type", None) or None,
                         extra=extra, overwrite=overwrite)


# ----------------------------------------------------------------------------------------------- the command
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one ``error:`` line from console_main, status 2, like a refused configuration
        raise ConfigError(f"flowrl export: {message} (see flowrl export --help)")


def export_main(argv: Sequence[str]) -> str:
    """``flowrl export --ckpt_path CKPT --config CONFIG [--config ...] --out DIR [--ema] [--overwrite]
    [--model.X=... overrides as given to flowrl fit]``."""
    parser = _Parser(
        prog="flowrl export",
        description="Export a flowrl fit checkpoint for stock diffusers: the LoRA (load_lora_weights) or, for "
        "finetune_type full, a whole pipeline folder (DiffusionPipeline.from_pretrained).",
        epilog="Options of flowrl fit (--model.X=..., --data.X=..., --trainer.X=...) given after these are applied "
        "to the config as in flowrl fit (e.g. a moved base: --model.policy.pretrained_model_name_or_path=DIR).",
    )
    parser.add_argument("--ckpt_path", required=True, help="the .ckpt written by flowrl fit")
    parser.add_argument("--config", "-c", action="append", required=True,
                        help="the run's config (its saved config.yaml, or the --config files it was started with)")
    parser.add_argument("--out", required=True, help="directory to write (new or empty)")
    parser.add_argument("--ema", action="store_true", help="export the checkpoint's EMA average (callbacks.EMA)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    args, overrides = parser.parse_known_args(list(argv))
    stray = [a for a in overrides if a.startswith("-") and not a.split("=", 1)[0].startswith(_OVERRIDE_PREFIXES)]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    out = export_checkpoint(args.ckpt_path, args.config, args.out, overrides=overrides, ema=args.ema,
                            overwrite=args.overwrite)
    info = json.load(open(os.path.join(out, EXPORT_INFO), encoding="utf-8"))
    what = (f"LoRA (rank {info['lora_rank']}, alpha {info['lora_alpha']})" if info["finetune_type"] == "lora"
            else f"{info['pipeline_class']} pipeline")
    print(f"exported {what} of {info['base_model']} to {out}")
    return out
