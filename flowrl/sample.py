"""``flowrl sample``: prompts in; a grid PNG, the images and their reward scores out.

The images come from a stock diffusers pipeline's own ``__call__`` (ODE sampling, the pipeline's scheduler), in
every case, so what is shown is what users of the trained model will get:

* a base model: ``--model`` (a hub id, a local folder, ``flowrl:toy``, or a full-pipeline folder of
  ``flowrl export``, whose recorded validation settings are then the defaults);
* an exported LoRA: ``--lora DIR`` (``flowrl export`` output) loaded with the pipeline's ``load_lora_weights``;
  the base is ``--model``, or the one recorded in the export; the run's validation settings are the defaults;
* a training checkpoint: ``--ckpt_path`` with the run's ``--config``, built as ``flowrl fit`` built it, its trained
  parameters (``--ema``: the EMA average) in the policy's pipeline; the run's validation settings and rewards are
  the defaults.

With ``--dynamics`` (``ODE``, ``Flow-SDE``, ``Dance-SDE``, ``CPS``, or a class's import path) the images are drawn
by flowrl's :class:`~flowrl.rollout.RolloutSampler` instead, the sampler of training and validation, over the same
pipeline: ``--sde_steps`` (default: every step but the last) take that dynamics at ``--noise_level``, the other
steps the ODE; ``--dynamics ODE`` gives the stock call's images.

Each image ``i`` starts from the noise of seed ``seed + i``, so a grid does not depend on ``--batch_size``::

    flowrl sample --model flowrl:toy --lora exported/ --prompt "a red circle" --num_per_prompt 4 --out samples/
    flowrl sample --model flowrl:toy --prompt "a red circle" --dynamics CPS --noise_level 0.5 --out samples/
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import torch
import yaml

from callbacks.plots import save_grid
from flowrl.errors import ConfigError
from flowrl.policy.adapter import conditioning_kwargs

__all__ = ["conditioning_kwargs", "load_sampling_pipeline", "sample_images", "sample_main", "sample_with_dynamics"]

GRID = "grid.png"
SCORES = "scores.json"


def _export_info(directory: str) -> dict:
    from flowrl.export import EXPORT_INFO

    path = os.path.join(directory, EXPORT_INFO)
    return json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else {}


def load_sampling_pipeline(model: str | None = None, lora: str | None = None):
    """A stock diffusers pipeline: ``model`` (hub id, folder, ``flowrl:toy``), with the LoRA folder ``lora`` of
    ``flowrl export`` loaded into it (the base defaults to the one that export records)."""
    from flowrl.policy.policy import PolicyConfig, _load_pipeline

    if lora is not None:
        if not os.path.isdir(lora):
            raise ConfigError(f"--lora {lora!r} is not a directory; give the folder flowrl export wrote")
        info = _export_info(lora)
        if info and info.get("format") != "diffusers_lora":
            raise ConfigError(f"--lora {lora!r} holds a full pipeline export; pass it as --model instead")
        model = model or info.get("pretrained_model_name_or_path") or info.get("base_model")
    if not model:
        raise ConfigError("give --model (a hub id, a local folder or flowrl:toy), --lora, or --ckpt_path with --config")
    # the class the LoRA was trained in (Wan2.2 TI2V-5B trains image-to-video from a text-to-video model folder)
    pipeline = _load_pipeline(PolicyConfig(model, pipeline_class=info.get("pipeline_class") if lora else None))
    if lora is not None:
        # one file per part that carries LoRA (Wan2.2's two experts), each with the arguments that load it
        for part in info.get("lora_files") or [{"load_lora_weights_kwargs": {}}]:
            pipeline.load_lora_weights(lora, **part.get("load_lora_weights_kwargs", {}))
    return pipeline


@torch.no_grad()
def sample_images(pipeline, prompts: Sequence[str], *, num_inference_steps: int | None = None,
                  guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
                  seed: int = 0, batch_size: int = 8, progress: bool = True, adapter=None,
                  conditions: Sequence | None = None) -> torch.Tensor:
    """``pipeline(prompt=...)`` over ``prompts`` in batches: images ``(N, C, H, W)`` in [0, 1] (the first frame of
    a video). Image ``i`` starts from the noise of ``torch.Generator().manual_seed(seed + i)``. The text context
    (and a video's frame count) is the one flowrl trains with (``adapter``, default the family's). ``conditions``:
    each prompt's condition images (editing, image-to-video), given to the stock call one prompt at a time, as the
    adapter encodes them (``stock_condition_kwargs``)."""
    from tqdm.auto import tqdm

    from flowrl.policy.adapter import adapter_for

    kwargs = {k: v for k, v in {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                                "height": height, "width": width}.items() if v is not None}
    kwargs.update(conditioning_kwargs(pipeline, adapter))
    if conditions is not None:
        adapter = adapter or adapter_for(pipeline)
        size = (height or pipeline.default_sample_size * pipeline.vae_scale_factor, width or
                pipeline.default_sample_size * pipeline.vae_scale_factor)
        batch_size = 1  # each prompt with its own images: the pipelines batch images in different ways
    pipeline.set_progress_bar_config(disable=True)
    out = []
    bar = tqdm(total=len(prompts), desc="sampling", unit="image", disable=not progress, file=sys.stderr)
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start:start + batch_size])
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
        extra = {} if conditions is None else adapter.stock_condition_kwargs(conditions[start], *size)
        result = pipeline(prompt=batch, generator=generators, output_type="pt", **kwargs, **extra)
        images = result.images if hasattr(result, "images") else result.frames
        images = torch.as_tensor(images).float().cpu()
        if images.ndim == 5:  # (B, T, C, H, W) video: its first frame
            images = images[:, 0]
        out.append(images.clamp(0, 1))
        bar.update(len(batch))
    bar.close()
    return torch.cat(out)


@torch.no_grad()
def sample_with_dynamics(policy, prompts: Sequence[str], dynamics, *, num_inference_steps: int, guidance_scale: float,
                         height: int, width: int, sde_steps: Sequence[int] | None = None, seed: int = 0,
                         batch_size: int = 8, conditions: Sequence | None = None) -> torch.Tensor:
    """Images ``(N, C, H, W)`` in [0, 1] drawn by a :class:`~flowrl.rollout.RolloutSampler` over ``policy``:
    ``sde_steps`` (None: every step but the last) with ``dynamics``, the other steps with the ODE. Image ``i`` starts
    from (and draws its step noise from) ``torch.Generator().manual_seed(seed + i)``."""
    from flowrl.dynamics import TrainSteps
    from flowrl.rollout import RolloutSampler

    steps = TrainSteps(list(sde_steps) if sde_steps else None).bind(num_inference_steps, seed).select(0)
    steps = steps if dynamics.is_stochastic else []
    sampler = RolloutSampler(policy, dynamics)
    out = []
    was_training = policy.training
    policy.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start:start + batch_size])
            generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
            images = sampler.sample(batch, height, width, num_inference_steps, guidance_scale, generators,
                                    train_steps=steps, conditions=None if conditions is None else
                                    conditions[start:start + batch_size]).images.float().cpu()
            out.append((images[:, :, 0] if images.ndim == 5 else images).clamp(0, 1))
    finally:
        policy.train(was_training)
    return torch.cat(out)


def _dynamics(args):
    """``--dynamics`` (a seed name or an import path) at ``--noise_level``."""
    if args.dynamics is None:
        if args.noise_level is not None or args.sde_steps:
            raise ConfigError("flowrl sample: --noise_level and --sde_steps shape the --dynamics; give --dynamics too")
        return None
    from flowrl.dynamics import DYNAMICS
    from flowrl.imports import import_class_path

    cls = DYNAMICS.get(args.dynamics) or import_class_path(args.dynamics)
    if args.noise_level is None:
        return cls()
    if not cls().is_stochastic:
        raise ConfigError(f"flowrl sample: --noise_level does nothing for --dynamics {args.dynamics}")
    return cls(noise_level=args.noise_level)


def _pipeline_default(pipeline, name: str):
    import inspect

    parameter = inspect.signature(type(pipeline).__call__).parameters.get(name)
    return None if parameter is None else parameter.default


def _reward(entries: Sequence[str]):
    """``--reward`` values (a registered name, or a YAML/JSON mapping such as ``{name: pickscore, args: {...}}``)."""
    from flowrl.rewards import WeightedReward

    specs = []
    for entry in entries:
        try:
            value = yaml.safe_load(entry)
        except yaml.YAMLError as e:
            raise ConfigError(f"--reward {entry!r} is neither a reward name nor a YAML mapping ({e})") from e
        specs.append({"name": value} if isinstance(value, str) else value)
    return WeightedReward.from_specs(specs)


def _prompts(args) -> tuple[list[str], list | None]:
    """The prompts, and each one's condition images (``--images`` for every ``--prompt``, or a JSONL file's rows)."""
    from flowrl.conditions import ConditionImages, check_condition_image
    from flowrl.data import load_prompt_rows

    prompts, conditions = list(args.prompt or []), None
    if args.images:
        for path in args.images:
            try:
                check_condition_image(path)
            except ValueError as err:
                raise ConfigError(f"flowrl sample --images: {err}") from None
        conditions = [ConditionImages.from_files(args.images)] * len(prompts)
    if args.prompts:
        rows = load_prompt_rows(args.prompts, "--prompts")
        if (rows.images is None) != (conditions is None) and (prompts or rows.images is not None and args.images):
            raise ConfigError("flowrl sample: the --prompt prompts and the --prompts file must both have condition "
                              "images (--images; rows with \"images\") or both have none")
        prompts += rows.prompts
        if rows.images is not None:
            conditions = (conditions or []) + [rows.condition(i) for i in range(len(rows))]
    if args.max_prompts is not None:
        prompts = prompts[:args.max_prompts]
        conditions = None if conditions is None else conditions[:args.max_prompts]
    if not prompts:
        raise ConfigError("give prompts: --prompt TEXT (repeatable) or --prompts FILE (.txt, .jsonl or toy:eval)")
    return prompts, conditions


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one ``error:`` line from console_main, status 2, like a refused configuration
        raise ConfigError(f"flowrl sample: {message} (see flowrl sample --help)")


def sample_main(argv: Sequence[str]) -> dict:
    parser = _Parser(prog="flowrl sample", description="Generate images from a base model, an exported LoRA or a "
                     "flowrl fit checkpoint with a stock diffusers pipeline; write a grid PNG, the images and "
                     "their reward scores.")
    src = parser.add_argument_group("what to sample from")
    src.add_argument("--model", help="base model: hub id, local folder, flowrl:toy, or a full export of flowrl export")
    src.add_argument("--lora", help="a LoRA folder written by flowrl export (base: --model or the export's own)")
    src.add_argument("--ckpt_path", help="a checkpoint of flowrl fit (with --config)")
    src.add_argument("--config", "-c", action="append", default=[], help="the checkpoint run's config.yaml")
    src.add_argument("--ema", action="store_true", help="the checkpoint's EMA weights (callbacks.EMA)")
    what = parser.add_argument_group("prompts and sampling")
    what.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    what.add_argument("--prompts", help="a prompt file: .txt, .jsonl (rows may name condition images) or a toy set "
                      "(toy:eval)")
    what.add_argument("--images", nargs="+", help="condition images of every --prompt (an editing or image-to-video "
                      "model)")
    what.add_argument("--max_prompts", type=int, help="only the first this many prompts")
    what.add_argument("--num_per_prompt", type=int, default=4, help="images per prompt, one grid row (default 4)")
    what.add_argument("--num_inference_steps", type=int, help="sampling steps (default: the run's or the pipeline's)")
    what.add_argument("--guidance_scale", type=float, help="guidance (default: the run's or the pipeline's)")
    what.add_argument("--resolution", type=int, nargs="+", help="H or H W (default: the run's or the pipeline's)")
    what.add_argument("--seed", type=int, default=0, help="image i starts from the noise of seed + i (default 0)")
    what.add_argument("--batch_size", type=int, default=8, help="images per pipeline call (default 8)")
    what.add_argument("--dynamics", help="draw with flowrl's sampler and this dynamics: ODE, Flow-SDE, Dance-SDE, CPS "
                      "or an import path (default: the stock pipeline's own call)")
    what.add_argument("--noise_level", type=float, help="the --dynamics' noise level (default: its own)")
    what.add_argument("--sde_steps", type=int, nargs="+", help="the steps that take the --dynamics (default: every "
                      "step but the last); the others take the ODE")
    what.add_argument("--reward", action="append", help="score with this reward: a name, or a mapping "
                      "'{name: pickscore, args: {...}}' (repeatable; default: the checkpoint run's rewards)")
    parser.add_argument("--out", required=True, help="directory for grid.png, scores.json and images/")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(list(argv))
    for name in ("num_per_prompt", "batch_size", "num_inference_steps", "max_prompts"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if args.resolution is not None and len(args.resolution) not in (1, 2):
        parser.error("--resolution takes H or H W")
    if args.ckpt_path and (args.model or args.lora):
        parser.error("--ckpt_path samples the checkpoint's own model; leave out --model / --lora")
    if args.ema and not args.ckpt_path:
        parser.error("--ema needs --ckpt_path")
    prompts, conditions = _prompts(args)
    reward = _reward(args.reward) if args.reward else None  # before any model loads: a bad reward fails fast
    dynamics = _dynamics(args)

    steps, guidance, (height, width) = args.num_inference_steps, args.guidance_scale, (None, None)
    export = None
    if args.resolution:
        height, width = args.resolution[0], args.resolution[-1]
    if args.ckpt_path:
        from flowrl.export import load_checkpoint_module

        module, _ = load_checkpoint_module(args.ckpt_path, args.config, ema=args.ema)
        pipeline, run_sampling, policy = module.policy.pipeline, module.validation_sampling(), module.policy
        reward, adapter = reward or module.reward_fn, module.policy.adapter
    else:
        if args.config:
            parser.error("--config belongs to --ckpt_path")
        pipeline, adapter, policy = load_sampling_pipeline(args.model, args.lora), None, None
        export = args.lora or (args.model if args.model and os.path.isdir(args.model) else None)
        run_sampling = (_export_info(export) if export else {}).get("sampling") or {}
    # Not given: the run's validation sampling (a checkpoint, or an export that records it), else the pipeline's.
    steps = steps or run_sampling.get("num_inference_steps")
    guidance = guidance if guidance is not None else run_sampling.get("guidance_scale")
    if height is None:
        height, width = run_sampling.get("height"), run_sampling.get("width")

    expanded = [p for p in prompts for _ in range(args.num_per_prompt)]
    expanded_conditions = None if conditions is None else [c for c in conditions for _ in range(args.num_per_prompt)]
    from flowrl.policy.adapter import adapter_for

    adapter = adapter or adapter_for(pipeline)
    area = (_export_info(export) if export else {}).get("condition_image_area")
    if area and adapter.condition_image_area is None:
        adapter.condition_image_area = int(area)  # the condition size the export was trained at
    adapter.check_conditions(expanded_conditions)
    if dynamics is None:
        images = sample_images(pipeline, expanded, num_inference_steps=steps, guidance_scale=guidance, height=height,
                               width=width, seed=args.seed, batch_size=args.batch_size, progress=not args.no_progress,
                               adapter=adapter, conditions=expanded_conditions)
    else:  # flowrl's sampler: the settings the stock call would take where neither the run nor a flag gives them
        from flowrl.policy import FlowMatchingPolicy

        if policy is None:
            area = adapter.condition_image_area if adapter is not None else None
            policy = FlowMatchingPolicy(pipeline, finetune_type="full", condition_image_area=area)
        steps = steps or _pipeline_default(pipeline, "num_inference_steps")
        guidance = guidance if guidance is not None else (_pipeline_default(pipeline, "guidance_scale") or 1.0)
        if height is None:
            height = width = pipeline.default_sample_size * pipeline.vae_scale_factor
        images = sample_with_dynamics(policy, expanded, dynamics, num_inference_steps=steps, guidance_scale=guidance,
                                      height=height, width=width, sde_steps=args.sde_steps, seed=args.seed,
                                      batch_size=args.batch_size, conditions=expanded_conditions)
    records = [{"index": i, "prompt": p, "seed": args.seed + i} for i, p in enumerate(expanded)]
    scores = None
    if reward is not None:
        scored = reward.score(images, expanded, conditions=expanded_conditions)
        if scored.errors:
            raise ConfigError(f"the reward failed: {'; '.join(scored.errors)}")
        scores = scored.total
        for i, record in enumerate(records):
            record["reward"] = float(scored.total[i])
            record.update({f"reward_{k}": float(v[i]) for k, v in scored.terms.items()})

    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    from flowrl.rewards.base import to_pil

    for record, picture in zip(records, to_pil(images)):
        record["image"] = os.path.join("images", f"{record['index']:04d}.png")
        picture.save(os.path.join(args.out, record["image"]))
    save_grid(images, os.path.join(args.out, GRID), args.num_per_prompt, row_labels=expanded[::args.num_per_prompt],
              captions=[f"{float(v):.3f}" for v in scores] if scores is not None else None)
    summary = {"source": {"model": args.model, "lora": args.lora, "ckpt_path": args.ckpt_path, "ema": args.ema},
               "dynamics": repr(dynamics) if dynamics is not None else "the pipeline's own call",
               "sde_steps": args.sde_steps, "num_inference_steps": steps, "guidance_scale": guidance, "height": height, "width": width,
               "mean_reward": float(scores.mean()) if scores is not None else None, "images": records}
    with open(os.path.join(args.out, SCORES), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    mean = f", mean reward {summary['mean_reward']:.4f}" if scores is not None else ""
    print(f"{len(records)} images of {len(prompts)} prompts{mean}: {os.path.join(args.out, GRID)}")
    return summary
