"""``flowrl convert``: a Flow-Factory YAML config as a flowrl config that does the same work.

    flowrl convert ff_config.yaml -o flowrl_config.yaml [--report]
    flowrl fit --config flowrl_config.yaml

Every key of the input is accounted for: **mapped** (to the flowrl option named in the report), **dropped** (it does
nothing in flowrl, or flowrl does it one fixed way; the reason is given) or **refused** (no equivalent: the command
writes nothing, exits 2 and lists each such key with what to do). ``RULES`` below is the whole table; ``--table``
prints it (``docs/convert.md`` is that output, checked by a test).

The batch arithmetic: a Flow-Factory epoch draws ``unique_sample_num_per_epoch`` prompts (M, first rounded up as
its sampler does) times ``group_size`` (K) samples over ``num_processes`` (W) processes in micro-batches of
``per_device_batch_size`` (B), and makes ``gradient_step_per_epoch`` (S) optimizer steps per inner epoch. flowrl's
iteration is that epoch: ``data.batch_size = M * K / W`` samples a process, ``model.train_batch_size = B``,
``model.gradient_accumulation_steps = (M * K / (W * B)) / S`` micro-batches per optimizer step (flowrl accumulates a
micro-batch's trained steps inside it, so Flow-Factory's factor of the trained steps per micro-batch drops out), so
samples per optimizer step and optimizer steps per epoch are equal; ``max_epochs`` becomes ``trainer.max_steps =
max_epochs * num_inner_epochs * S``; epochs counted by other options (``eval_freq``, ``save_freq``) become
iterations (validation) or optimizer steps (checkpoints).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from flowrl.errors import ConfigError

__all__ = ["MAPPED", "DROPPED", "REFUSED", "RULES", "convert", "convert_main", "rules_table"]

MAPPED, DROPPED, REFUSED = "mapped", "dropped", "refused"


@dataclass(frozen=True)
class Rule:
    """What becomes of one Flow-Factory key: ``target`` (the flowrl option) and ``note`` (how, why, or what to do)."""

    status: str
    target: str = ""
    note: str = ""


def _m(target: str, note: str = "") -> Rule:
    return Rule(MAPPED, target, note)


def _d(note: str) -> Rule:
    return Rule(DROPPED, "", note)


def _r(note: str) -> Rule:
    return Rule(REFUSED, "", note)


#: Flow-Factory's model types flowrl has families for, and their strategy presets' block names
FAMILIES = {"sd3-5": "JointTransformerBlock", "flux1": "FluxTransformerBlock", "qwen-image": "QwenImageTransformerBlock",
            "wan2_t2v": "WanTransformerBlock", "flux1-kontext": "FluxTransformerBlock",
            "z-image": "ZImageTransformerBlock", "wan2_i2v": "WanTransformerBlock", "flux2": "Flux2TransformerBlock",
            "flux2-klein": "Flux2TransformerBlock"}
#: model types whose hub folders may name another pipeline class than the one flowrl trains them in
PIPELINE_CLASSES = {"wan2_i2v": "WanImageToVideoPipeline"}
#: Flow-Factory's trainer types -> flowrl's algorithm classes
TRAINERS = {"grpo": "GRPO", "grpo-guard": "GRPOGuard", "nft": "NFT", "awm": "AWM", "dgpo": "DGPO", "dpo": "DiffusionDPO",
            "crd": "CRD", "dppo": "FlowDPPO", "diffusion-opd": "DiffusionOPD"}
DYNAMICS = {"Flow-SDE": "FlowSDE", "Dance-SDE": "DanceSDE", "CPS": "CPS", "ODE": "ODE"}
#: Flow-Factory reward model names -> flowrl's registered rewards
REWARD_NAMES = {"pickscore": "pickscore", "pickscore_rank": "pickscore_rank", "clip": "clip_score", "ocr": "ocr"}
REMOTE_REWARD = "RemotePointwiseRewardModel"
#: Flow-Factory's VLM judge over an OpenAI-compatible server -> flowrl's vlm_judge, and its options' names there
VLM_REWARD = "vllm_evaluate"
VLM_ARGS = {"api_base_url": "base_url", "vlm_model": "model", "max_concurrent": "concurrency", "max_retries": "retries",
            "timeout": "timeout", "top_logprobs": "top_logprobs"}
#: Flow-Factory's question is fixed ("Is it a beautiful image?") and ignores the prompt; vlm_judge's template must
#: name the prompt, so the converted question asks both
VLM_TEMPLATE = 'The image was generated for the prompt "{prompt}". Is it a beautiful image? Answer Yes or No.'
PRECISIONS = {"bf16": "bf16-mixed", "fp16": "16-mixed", "no": "32-true"}
DECOUPLED = ("nft", "awm", "dgpo", "dpo", "crd")

RULES: dict[str, Rule] = {
    # top level: the launcher
    "launcher": _d("Lightning starts the processes itself (trainer.devices, trainer.num_nodes)"),
    "config_file": _m("trainer.strategy", "FSDP / FSDP2 files: callbacks.FSDP2Strategy with the family's blocks "
                      "(as lightning_configs/strategies/fsdp2_<family>.yaml); DeepSpeed ZeRO-1/2 and multi_gpu: ddp "
                      "(an approximation: ZeRO shards optimizer state, DDP replicates it); ZeRO-3: FSDP2 (approximate)"),
    "num_processes": _m("trainer.devices", "the processes of one node; with num_machines, divided by it"),
    "num_machines": _m("trainer.num_nodes"),
    "machine_rank": _d("set NODE_RANK in each node's environment (Lightning reads it)"),
    "main_process_ip": _d("set MASTER_ADDR in the environment (Lightning reads it)"),
    "main_process_port": _d("set MASTER_PORT in the environment (Lightning reads it)"),
    "mixed_precision": _m("trainer.precision", "bf16 -> bf16-mixed, fp16 -> 16-mixed, no -> 32-true; bf16 also keeps "
                          "the frozen weights (encoders, VAE, a LoRA's base) in bfloat16 (model.policy.frozen_dtype)"),
    # data
    "data.dataset_dir": _m("data.train_prompts / data.val_prompts", "<dir>/train.jsonl or train.txt, and "
                           "test.jsonl or test.txt when present (no test file: no validation)"),
    "data.max_dataset_size": _m("data.max_train_prompts"),
    "data.dataloader_num_workers": _m("data.num_workers"),
    "data.cache_dir": _d("flowrl encodes prompts as it trains and keeps them in memory (policy.prompt_cache_mb)"),
    "data.preprocessing_batch_size": _d("no preprocessing pass: prompts are encoded as they come"),
    "data.enable_preprocess": _d("no preprocessing pass: prompts are encoded as they come"),
    "data.force_reprocess": _d("no preprocessing cache"),
    "data.preprocess_parallelism": _d("no preprocessing pass"),
    "data.sampler_type": _d("flowrl's sampler keeps each group whole on one process (as group_contiguous)"),
    "data.image_dir": _m("data.image_dir", "the folder of the rows' condition images (Flow-Factory's default for a "
                         ".jsonl dataset, <dataset_dir>/images, written where that folder exists)"),
    "data.video_dir": _r("condition videos are not supported; remove it"),
    "data.audio_dir": _r("audio is not supported; remove it"),
    # model
    "model.model_type": _m("model.policy (the family)", "sd3-5, flux1, flux1-kontext, flux2, flux2-klein, qwen-image, "
                           "z-image, wan2_t2v, wan2_i2v; others refused by name"),
    "model.model_name_or_path": _m("model.policy.pretrained_model_name_or_path"),
    "model.finetune_type": _m("model.policy.finetune_type"),
    "model.lora_rank": _m("model.policy.lora_rank"),
    "model.lora_alpha": _m("model.policy.lora_alpha", "null is Flow-Factory's 2 * lora_rank, written out"),
    "model.target_modules": _m("model.policy.target_modules", "default -> null (the family's defaults); a list as "
                               "is; all: refused with LoRA (name the modules), dropped with full fine-tuning"),
    "model.target_components": _m("(the denoiser)", "[transformer] only; other components are refused"),
    "model.master_weight_dtype": _d("flowrl keeps trained weights in float32 and computes in trainer.precision"),
    "model.resume_path": _r("set null; resume a flowrl run with flowrl fit --ckpt_path, or start from a LoRA by "
                            "exporting it into the base model"),
    "model.resume_type": _d("resume: flowrl fit --ckpt_path"),
    "model.attn_backend": _m("model.policy.attention_backend", "diffusers' attention dispatcher, the same names"),
    # scheduler
    "scheduler.dynamics_type": _m("model.dynamics", "Flow-SDE -> flowrl.dynamics.FlowSDE, Dance-SDE -> DanceSDE, "
                                  "CPS -> CPS, ODE -> ODE"),
    "scheduler.noise_level": _m("model.dynamics.init_args.noise_level", "none for the ODE"),
    "scheduler.sde_steps": _m("model.step_selection.init_args.train_steps"),
    "scheduler.num_sde_steps": _m("model.step_selection.init_args.num_train_steps", "written out (Flow-Factory's "
                                  "default is 1, flowrl's all)"),
    "scheduler.seed": _d("flowrl draws the trained steps from model.seed (train.seed)"),
    # train: shared
    "train.trainer_type": _m("model.class_path", ", ".join(f"{k} -> flowrl.algorithms.{v}" for k, v in TRAINERS.items())),
    "train.resolution": _m("model.resolution"),
    "train.height": _m("model.resolution[0]"),
    "train.width": _m("model.resolution[1]"),
    "train.max_epochs": _m("trainer.max_steps", "max_epochs * num_inner_epochs * gradient_step_per_epoch optimizer "
                           "steps; null -> -1 (no end)"),
    "train.per_device_batch_size": _m("model.train_batch_size"),
    "train.gradient_step_per_epoch": _m("model.gradient_accumulation_steps", "see the batch arithmetic"),
    "train.gradient_accumulation_steps": _m("model.gradient_accumulation_steps", "auto: from gradient_step_per_epoch; "
                                            "a number: divided by the trained steps per micro-batch"),
    "train.unique_sample_num_per_epoch": _m("data.batch_size", "M * group_size / num_processes samples a process"),
    "train.group_size": _m("model.group_size"),
    "train.num_inner_epochs": _m("model.num_inner_epochs"),
    "train.max_grad_norm": _m("model.max_grad_norm"),
    "train.num_inference_steps": _m("model.num_inference_steps"),
    "train.guidance_scale": _m("model.guidance_scale", "values below 1 (no guidance) become 1"),
    "train.seed": _m("seed_everything, model.seed, data.seed"),
    "train.learning_rate": _m("model.optimizer.init_args.lr", "AdamW"),
    "train.adam_weight_decay": _m("model.optimizer.init_args.weight_decay"),
    "train.adam_betas": _m("model.optimizer.init_args.betas"),
    "train.adam_epsilon": _m("model.optimizer.init_args.eps"),
    "train.enable_gradient_checkpointing": _m("model.policy.gradient_checkpointing"),
    "train.offload_samples_to_cpu": _m("model.offload_rollout", "the stored trajectory (or final latents) in host "
                                       "memory from sampling to training"),
    "train.latent_storage_dtype": _m("model.latent_storage_dtype", "fp16 / bf16 -> float16 / bfloat16, where a "
                                     "trajectory is stored; each trained step rounded where it is made, so the "
                                     "on-policy ratio stays exactly 1"),
    "train.global_std": _m("model.global_std"),
    "train.advantage_aggregation": _m("model.advantage_estimator", "sum -> group, gdpo -> gdpo"),
    "train.clip_range": _m("model.clip_range"),
    "train.adv_clip_range": _m("model.adv_clip_range"),
    "train.kl_beta": _m("callbacks.ReferenceModel(kl_beta)", "added when kl_beta > 0"),
    "train.kl_type": _m("callbacks.ReferenceModel(kl_type)"),
    "train.ref_param_device": _m("callbacks.ReferenceModel(ref_param_device) / model.ref_param_device (dpo)",
                                 "cuda -> same_as_model"),
    "train.off_policy": _m("callbacks.OffPolicySampling(off_policy)"),
    "train.ema_decay": _m("callbacks.EMA(ema_decay)", "0: no EMA"),
    "train.ema_update_interval": _m("callbacks.EMA(ema_update_interval)", "epochs are flowrl's iterations"),
    "train.ema_device": _m("callbacks.EMA(ema_device)", "cuda -> same_as_model"),
    "train.ema_decay_schedule": _m("callbacks.EMA(ema_decay_schedule)"),
    "train.flat_steps": _m("callbacks.EMA(flat_steps)"),
    "train.ramp_rate": _m("callbacks.EMA(ramp_rate)"),
    "train.warmup_steps": _m("callbacks.EMA(warmup_steps)"),
    "train.initial_decay": _m("callbacks.EMA(initial_decay)"),
    "train.total_steps": _m("callbacks.EMA(decay_steps)"),
    "train.num_train_timesteps": _m("model.num_train_timesteps", "0 (auto) -> Flow-Factory's own value, "
                                    "max(1, int(num_inference_steps * width of timestep_range))"),
    "train.time_sampling_strategy": _m("model.time_sampling_strategy"),
    "train.time_shift": _m("model.time_shift"),
    "train.timestep_range": _m("model.timestep_fraction", "a number f or [0, f]; a band not starting at 0 is refused"),
    "train.num_frames": _m("model.policy.num_frames"),
    "train.frame_rate": _d("the frame rate of saved videos only (flowrl sample writes frames)"),
    # train: algorithms
    "train.nft_beta": _m("model.nft_beta"),
    "train.ema_kl_beta": _m("model.ema_kl_beta"),
    "train.awm_weighting": _m("model.awm_weighting"),
    "train.ghuber_power": _m("model.ghuber_power"),
    "train.beta": _m("model.dpo_beta", "dpo"),
    "train.weighting_scheme": _m("model.time_sampling_strategy", "logit_normal / uniform"),
    "train.logit_mean": _m("(logit_normal)", "0 only: flowrl's logit-normal is standard"),
    "train.logit_std": _m("(logit_normal)", "1 only: flowrl's logit-normal is standard"),
    "train.dpo_beta": _m("model.dpo_beta", "dgpo"),
    "train.use_shared_noise": _m("model.use_shared_noise"),
    "train.clip_dsm": _m("model.clip_dsm"),
    "train.clip_kl": _m("(dgpo)", "false only: flowrl's DGPO does not clip its KL"),
    "train.switch_ema_ref": _d("flowrl's DGPO samples with the EMA from the start when OffPolicySampling is on"),
    "train.use_ema_ref": _m("model.use_ema_ref"),
    "train.ema_ref_max_decay": _m("callbacks.EMA(ema_decay)", "dgpo's reference EMA (piecewise_linear)"),
    "train.ema_ref_ramp_rate": _m("callbacks.EMA(ramp_rate)", "dgpo's reference EMA"),
    "train.ema_ref_device": _m("callbacks.EMA(ema_device)", "dgpo's reference EMA"),
    "train.kl_cfg": _m("model.kl_cfg", "crd; dgpo: 1 only (flowrl's DGPO reference is unguided)"),
    "train.crd_beta": _m("model.crd_beta"),
    "train.crd_loss_type": _m("model.crd_loss_type"),
    "train.use_old_for_loss": _m("(crd)", "true only: flowrl's CRD compares with the old (sampling) model"),
    "train.adaptive_logp": _m("model.adaptive_logp"),
    "train.weight_temp": _m("model.weight_temp"),
    "train.old_model_decay": _d("flowrl's CRD old model is the EMA callback (callbacks.EMA + OffPolicySampling)"),
    "train.sampling_model_decay": _d("flowrl's CRD samples with the EMA callback's weights"),
    "train.reward_adaptive_kl": _m("model.reward_adaptive_kl"),
    "train.kl_mask_threshold": _m("model.kl_mask_threshold"),
    "train.kl_mask_type": _m("model.add_kl_coefficient", "x-based only (the exact transition KL)"),
    "train.kl_guidance_scale": _m("(dppo)", "null only"),
    "train.teachers": _m("model.teachers", "path, name and guidance_scale; applicable_datasets is dropped (every "
                         "teacher supervises every prompt)"),
    "train.teacher_param_device": _d("teachers are frozen copies on the model's device"),
    # eval
    "eval.resolution": _m("model.eval.resolution"),
    "eval.height": _m("model.eval.resolution[0]"),
    "eval.width": _m("model.eval.resolution[1]"),
    "eval.per_device_batch_size": _m("data.val_batch_size"),
    "eval.seed": _m("model.eval.seed", "null: train.seed"),
    "eval.guidance_scale": _m("model.eval.guidance_scale", "values below 1 become 1"),
    "eval.num_inference_steps": _m("model.eval.num_inference_steps"),
    "eval.eval_freq": _m("trainer.val_check_interval", "epochs are iterations; 0 -> no validation"),
    # log
    "log.run_name": _m("trainer.default_root_dir", "<save_dir>/<run_name>; null -> <model_type>_<finetune_type>_"
                       "<trainer_type>"),
    "log.save_dir": _m("trainer.default_root_dir"),
    "log.project": _m("trainer.logger (WandbLogger project)"),
    "log.logging_backend": _m("trainer.logger", "wandb -> WandbLogger, tensorboard -> TensorBoardLogger, none -> "
                              "CSVLogger; swanlab is refused"),
    "log.save_freq": _m("ModelCheckpoint(every_n_train_steps)", "epochs times optimizer steps per epoch; 0: no "
                        "checkpoints"),
    "log.save_model_only": _d("flowrl checkpoints hold the trained parameters and what a resume needs"),
    "log.verbose": _m("trainer.enable_progress_bar"),
    # rewards (each entry of rewards: / eval_rewards:)
    "rewards.name": _m("label"),
    "rewards.reward_model": _m("name / class_path / remote", "PickScore -> pickscore, PickScore_Rank -> "
                               "pickscore_rank, CLIP -> clip_score, OCR -> ocr, RemotePointwiseRewardModel -> remote, "
                               "vllm_evaluate -> vlm_judge (its question names the prompt); a dotted class path -> "
                               "class_path; rational_rewards, clap and imagebind are refused"),
    "rewards.weight": _m("weight"),
    "rewards.server_url": _m("args.url (remote)"),
    "rewards.timeout": _m("args.timeout (remote, vlm_judge)"),
    "rewards.api_base_url": _m("args.base_url (vlm_judge)"),
    "rewards.vlm_model": _m("args.model (vlm_judge)"),
    "rewards.max_concurrent": _m("args.concurrency (vlm_judge)"),
    "rewards.max_retries": _m("args.retries (vlm_judge)"),
    "rewards.top_logprobs": _m("args.top_logprobs (vlm_judge)"),
    "rewards.api_key": _d("vlm_judge reads the key from FLOWRL_VLM_API_KEY, never from a config (configs are logged)"),
    "rewards.canonicalize": _d("vlm_judge sums every case and spacing of the yes-token"),
    "rewards.max_cache_size": _d("vlm_judge caches no answers (rollout samples are always new)"),
    "rewards.retry_attempts": _m("args.retries (remote)"),
    "rewards.model_name_or_path": _m("args.model_name_or_path"),
    "rewards.async_reward": _m("model.async_rewards"),
    "rewards.dtype": _d("rewards run in their own default precision"),
    "rewards.device": _d("rewards run on the module's device"),
    "rewards.batch_size": _d("rewards score each micro-batch"),
    "rewards.num_workers": _d("async rewards use one background thread"),
    "eval_rewards": _m("model.eval_rewards", "each entry as a rewards entry; scored at validation only"),
}


class Conversion:
    """One conversion: the output config being built and the report of every input key."""

    def __init__(self, ff: dict):
        self.ff = ff
        self.out: dict[str, Any] = {}
        self.report: list[tuple[str, str, str]] = []  # (key, status, what)

    # ------------------------------------------------------------------ bookkeeping
    def note(self, key: str, status: str | None = None, what: str | None = None) -> None:
        rule = RULES[_rule_key(key) if "[" in key else key]
        status = status or rule.status
        what = what if what is not None else (rule.target + (f" ({rule.note})" if rule.note else "")
                                              if status == MAPPED else rule.note)
        self.report.append((key, status, what))

    def put(self, path: str, value) -> None:
        node = self.out
        *parents, last = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    def get(self, path: str, default=None):
        node = self.out
        for p in path.split("."):
            if not isinstance(node, dict) or p not in node:
                return default
            node = node[p]
        return node

    @property
    def refused(self) -> list[tuple[str, str, str]]:
        return [r for r in self.report if r[1] == REFUSED]


def _rule_key(key: str) -> str:
    """``rewards[0].weight`` -> ``rewards.weight``; ``eval_rewards[1]`` -> ``eval_rewards``."""
    head, _, rest = key.partition("].")
    section = "rewards" if head.startswith("eval_rewards") else head.split("[")[0]  # the same entry keys
    return f"{section}.{rest}" if rest else head.split("[")[0]


def _section(ff: dict, name: str) -> dict:
    value = ff.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"Flow-Factory section {name!r} must be a mapping, got {type(value).__name__}")
    return value


def _pair(value) -> list[int]:
    return [int(value), int(value)] if isinstance(value, (int, float)) else [int(v) for v in value]


def _device(value: str) -> str:
    return "same_as_model" if str(value).startswith("cuda") else str(value)


def _aligned_prompts(m: int, k: int, w: int, b: int, s: int, auto: bool) -> int:
    """Flow-Factory's ``unique_sample_num_per_epoch`` after its group_contiguous alignment."""
    base = (w * b) // math.gcd(k, w * b) * (s if auto else 1)
    step = base * w // math.gcd(base, w)
    return -(-m // step) * step


def convert(ff: dict, config_dir: str = ".") -> Conversion:
    """The flowrl config of the Flow-Factory config ``ff`` (paths relative to ``config_dir``) and its report."""
    c = Conversion(ff)
    train, model, sched = _section(ff, "train"), _section(ff, "model"), _section(ff, "scheduler")
    data, evals, log = _section(ff, "data"), _section(ff, "eval"), _section(ff, "log")
    trainer_type = str(train.get("trainer_type", "grpo"))
    model_type = str(model.get("model_type", "flux1"))

    # -------------------------------------------------------------- the algorithm and the model
    if trainer_type not in TRAINERS:
        c.note("train.trainer_type", REFUSED, f"trainer_type {trainer_type!r} has no flowrl algorithm; choose one of "
               f"{', '.join(TRAINERS)}")
    else:
        c.put("model.class_path", f"flowrl.algorithms.{TRAINERS[trainer_type]}")
        c.note("train.trainer_type", what=f"model.class_path: flowrl.algorithms.{TRAINERS[trainer_type]}")
    if model_type not in FAMILIES:
        c.note("model.model_type", REFUSED, f"model_type {model_type!r} has no flowrl family; flowrl has "
               f"{', '.join(FAMILIES)}")
    elif "model_type" in model:
        c.note("model.model_type", what=f"the {model_type} family (from the checkpoint's pipeline)"
               + (f"; policy.pipeline_class: {PIPELINE_CLASSES[model_type]}" if model_type in PIPELINE_CLASSES else ""))
        if model_type in PIPELINE_CLASSES:
            c.put("model.init_args.policy.pipeline_class", PIPELINE_CLASSES[model_type])
    init = "model.init_args"
    c.put(f"{init}.policy.pretrained_model_name_or_path", model.get("model_name_or_path", "black-forest-labs/FLUX.1-dev"))
    finetune = str(model.get("finetune_type", "full"))
    c.put(f"{init}.policy.finetune_type", finetune)
    for key in ("model_name_or_path", "finetune_type"):
        if key in model:
            c.note(f"model.{key}")
    if finetune == "lora":
        rank = int(model.get("lora_rank", 8))
        c.put(f"{init}.policy.lora_rank", rank)
        c.put(f"{init}.policy.lora_alpha", float(model.get("lora_alpha") or 2 * rank))
    if ff.get("mixed_precision", "bf16") == "bf16":  # Flow-Factory keeps frozen weights in the inference dtype
        c.put(f"{init}.policy.frozen_dtype", "bfloat16")
    for key in ("lora_rank", "lora_alpha"):
        if key in model:
            c.note(f"model.{key}", DROPPED if finetune != "lora" else None,
                   "full fine-tuning has no LoRA" if finetune != "lora" else None)
    if "target_modules" in model:
        tm = model["target_modules"]
        if tm == "default":
            c.note("model.target_modules", what="model.policy.target_modules: null (the family's defaults)")
        elif tm == "all":
            if finetune == "lora":
                c.note("model.target_modules", REFUSED, "target_modules: all with LoRA: name the modules (a list) "
                       "or use default")
            else:
                c.note("model.target_modules", DROPPED, "full fine-tuning trains every parameter of the denoiser")
        else:
            c.put(f"{init}.policy.target_modules", [tm] if isinstance(tm, str) else list(tm))
            c.note("model.target_modules")
    if "target_components" in model:
        comps = model["target_components"]
        comps = [comps] if isinstance(comps, str) else list(comps)
        c.note("model.target_components", None if comps == ["transformer"] else REFUSED,
               None if comps == ["transformer"] else f"target_components {comps}: flowrl trains the denoiser "
               "(transformer) only")
    for key in ("master_weight_dtype", "resume_type"):
        if key in model:
            c.note(f"model.{key}")
    if model.get("attn_backend") is not None:
        c.put(f"{init}.policy.attention_backend", str(model["attn_backend"]))
        c.note("model.attn_backend")
    elif "attn_backend" in model:
        c.note("model.attn_backend", DROPPED, "null: nothing to do")
    for key in ("resume_path",):
        if key in model:
            c.note(f"model.{key}", DROPPED if model[key] is None else None, "null: nothing to do"
                   if model[key] is None else None)
    _unknown(c, "model", model, {"model_type", "model_name_or_path", "finetune_type", "lora_rank", "lora_alpha",
                                 "target_modules", "target_components", "master_weight_dtype", "resume_path",
                                 "resume_type", "attn_backend"})

    # -------------------------------------------------------------- sampling, dynamics, trained steps
    _sampling(c, train, sched, trainer_type, init)
    # -------------------------------------------------------------- the algorithm's options, batches, steps
    _algorithm_options(c, train, trainer_type, init)
    steps_per_epoch = _batches(c, ff, train, trainer_type, init)
    _optimizer(c, train, init)
    _callbacks(c, train, trainer_type)
    # -------------------------------------------------------------- launcher, data, eval, log, rewards
    _launcher(c, ff, model_type)
    _data(c, data, config_dir, evals)
    _eval(c, evals, train, init)
    _log(c, log, model_type, finetune, trainer_type, steps_per_epoch)
    _rewards(c, ff, init)
    _unknown(c, "", ff, {"launcher", "config_file", "num_processes", "num_machines", "machine_rank", "main_process_ip",
                         "main_process_port", "mixed_precision", "data", "model", "scheduler", "train", "eval", "log",
                         "rewards", "eval_rewards"})
    return c


def _unknown(c: Conversion, section: str, values: dict, known: set[str]) -> None:
    for key in sorted(set(values) - known):
        name = f"{section}.{key}" if section else key
        c.report.append((name, REFUSED, f"unknown key {name!r}: Flow-Factory keeps it as an unchecked extra; flowrl "
                                        "has no such option (remove it)"))


def _sampling(c: Conversion, train: dict, sched: dict, trainer_type: str, init: str) -> None:
    height, width = _pair(train.get("resolution", 512))
    height, width = int(train.get("height") or height), int(train.get("width") or width)
    c.put(f"{init}.resolution", [height, width] if height != width else height)
    for key in ("resolution", "height", "width"):
        if key in train:
            c.note(f"train.{key}")
    c.put(f"{init}.num_inference_steps", int(train.get("num_inference_steps", 10)))
    c.put(f"{init}.guidance_scale", max(1.0, float(train.get("guidance_scale", 3.5))))
    for key in ("num_inference_steps", "guidance_scale", "num_inner_epochs", "max_grad_norm"):
        if key in train:
            c.note(f"train.{key}")
    dynamics = str(sched.get("dynamics_type", "Flow-SDE"))
    if dynamics not in DYNAMICS:
        c.note("scheduler.dynamics_type", REFUSED, f"dynamics_type {dynamics!r}: choose one of {', '.join(DYNAMICS)}")
        return
    spec: dict[str, Any] = {"class_path": f"flowrl.dynamics.{DYNAMICS[dynamics]}"}
    if dynamics != "ODE":
        spec["init_args"] = {"noise_level": float(sched.get("noise_level", 0.7))}
    c.put(f"{init}.dynamics", spec)
    if "dynamics_type" in sched:
        c.note("scheduler.dynamics_type")
    if "noise_level" in sched:
        c.note("scheduler.noise_level", DROPPED if dynamics == "ODE" else None,
               "the ODE has no noise level" if dynamics == "ODE" else None)
    coupled = trainer_type in ("grpo", "grpo-guard", "dppo")
    if coupled or trainer_type == "diffusion-opd":
        selection = {}
        if sched.get("sde_steps") is not None:
            selection["train_steps"] = [int(i) for i in sched["sde_steps"]]
        num = sched.get("num_sde_steps", 1)
        if num is not None:
            selection["num_train_steps"] = int(num)
        if selection:
            c.put(f"{init}.step_selection", {"class_path": "flowrl.dynamics.TrainSteps", "init_args": selection})
        for key in ("sde_steps", "num_sde_steps"):
            if key in sched:
                c.note(f"scheduler.{key}")
    else:
        for key in ("sde_steps", "num_sde_steps"):
            if key in sched:
                c.note(f"scheduler.{key}", DROPPED, f"{trainer_type} trains re-noised clean samples, not sampling "
                       "steps (its times: num_train_timesteps, timestep_range)")
    if "seed" in sched:
        c.note("scheduler.seed")
    _unknown(c, "scheduler", sched, {"dynamics_type", "noise_level", "sde_steps", "num_sde_steps", "seed"})


def _batches(c: Conversion, ff: dict, train: dict, trainer_type: str, init: str) -> int:
    """Batch sizes, accumulation and the run's length; returns optimizer steps per Flow-Factory epoch."""
    w = int(ff.get("num_processes", 1))
    b = int(train.get("per_device_batch_size", 1))
    k = int(train.get("group_size", 1))
    s = int(train.get("gradient_step_per_epoch", 2))
    inner = int(train.get("num_inner_epochs", 1))
    gas = train.get("gradient_accumulation_steps", "auto")
    auto = gas == "auto"
    if k < 2:
        c.note("train.group_size", REFUSED, f"group_size {k}: flowrl's groups (its advantages, and the monitor of "
               "diffusion-opd) need 2 or more samples a prompt; set group_size: 2 or more")
    elif "group_size" in train:
        c.note("train.group_size")
    m = _aligned_prompts(int(train.get("unique_sample_num_per_epoch", 8)), k, w, b, s, auto)
    batches = m * k // (w * b)  # micro-batches a process samples (and trains) per epoch
    c.put(f"{init}.group_size", k)
    c.put(f"{init}.train_batch_size", b)
    c.put("data.batch_size", m * k // w)
    c.put(f"{init}.num_inner_epochs", inner)
    c.put(f"{init}.max_grad_norm", float(train.get("max_grad_norm", 1.0)))
    if auto:
        accumulation = max(1, batches // s)
        optimizer_steps = inner * batches // accumulation
    else:
        per_batch = _trained_units(c, train, trainer_type)
        accumulation = max(1, int(gas) // per_batch)
        if int(gas) % per_batch:
            c.report.append(("train.gradient_accumulation_steps", MAPPED, f"model.gradient_accumulation_steps: "
                             f"{accumulation} (approximate: {gas} is not a multiple of the {per_batch} trained steps "
                             "per micro-batch)"))
        optimizer_steps = inner * batches // accumulation
    c.put(f"{init}.gradient_accumulation_steps", accumulation)
    if "unique_sample_num_per_epoch" in train:
        c.note("train.unique_sample_num_per_epoch", what=f"data.batch_size: {m * k // w} ({m} prompts x {k} / {w} "
               "processes)")
    for key in ("per_device_batch_size", "gradient_step_per_epoch"):
        if key in train:
            c.note(f"train.{key}")
    if "gradient_accumulation_steps" in train and not any(r[0] == "train.gradient_accumulation_steps" for r in c.report):
        c.note("train.gradient_accumulation_steps", what=f"model.gradient_accumulation_steps: {accumulation}")
    epochs = train.get("max_epochs")
    c.put("trainer.max_steps", -1 if epochs is None or int(epochs) < 0 else int(epochs) * optimizer_steps)
    c.put("trainer.max_epochs", -1)
    if "max_epochs" in train:
        c.note("train.max_epochs", what=f"trainer.max_steps: {c.get('trainer.max_steps')} ({optimizer_steps} "
               "optimizer steps an epoch)")
    return optimizer_steps


def _trained_units(c: Conversion, train: dict, trainer_type: str) -> int:
    """Flow-Factory's backward passes per micro-batch (T): the SDE steps or the training times."""
    if trainer_type in ("grpo", "grpo-guard", "dppo"):
        return int(((c.ff.get("scheduler") or {}).get("num_sde_steps")) or 1)
    return max(1, int(c.get("model.init_args.num_train_timesteps") or train.get("num_train_timesteps") or 1))


def _optimizer(c: Conversion, train: dict, init: str) -> None:
    args = {"lr": float(train.get("learning_rate", 1e-5)), "weight_decay": float(train.get("adam_weight_decay", 1e-4)),
            "betas": [float(x) for x in train.get("adam_betas", (0.9, 0.999))],
            "eps": float(train.get("adam_epsilon", 1e-8))}
    c.put(f"{init}.optimizer", {"class_path": "torch.optim.AdamW", "init_args": args})
    for key in ("learning_rate", "adam_weight_decay", "adam_betas", "adam_epsilon"):
        if key in train:
            c.note(f"train.{key}")
    seed = int(train.get("seed", 42))
    c.put("seed_everything", seed)
    c.put(f"{init}.seed", seed)
    c.put("data.seed", seed)
    if "seed" in train:
        c.note("train.seed")
    if "enable_gradient_checkpointing" in train:
        c.put(f"{init}.policy.gradient_checkpointing", bool(train["enable_gradient_checkpointing"]))
        c.note("train.enable_gradient_checkpointing")
    trainer_type = str(train.get("trainer_type", "grpo"))
    stores = trainer_type not in DECOUPLED  # the trained steps' latents are kept for training
    if "offload_samples_to_cpu" in train:
        if train["offload_samples_to_cpu"]:
            c.put(f"{init}.offload_rollout", True)
            c.note("train.offload_samples_to_cpu")
        else:
            c.note("train.offload_samples_to_cpu", DROPPED, "false: nothing to do")
    if "latent_storage_dtype" in train:
        dtype = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}.get(str(train["latent_storage_dtype"]))
        if dtype is None:
            c.note("train.latent_storage_dtype", REFUSED, f"latent_storage_dtype {train['latent_storage_dtype']!r}: "
                   "use fp32, bf16 or fp16")
        elif dtype != "float32" and stores:
            c.put(f"{init}.latent_storage_dtype", dtype)
            c.note("train.latent_storage_dtype")
        else:
            c.note("train.latent_storage_dtype", DROPPED, "fp32: the default" if dtype == "float32" else
                   f"{trainer_type} stores no trajectory (final latents only, float32)")


_DIRECT = {  # train key -> model option, taken as is where the algorithm has it
    "global_std": "global_std", "clip_range": "clip_range", "adv_clip_range": "adv_clip_range", "nft_beta": "nft_beta",
    "ema_kl_beta": "ema_kl_beta", "awm_weighting": "awm_weighting", "ghuber_power": "ghuber_power",
    "dpo_beta": "dpo_beta", "use_shared_noise": "use_shared_noise", "clip_dsm": "clip_dsm", "use_ema_ref": "use_ema_ref",
    "crd_beta": "crd_beta", "crd_loss_type": "crd_loss_type", "adaptive_logp": "adaptive_logp",
    "weight_temp": "weight_temp", "reward_adaptive_kl": "reward_adaptive_kl", "kl_mask_threshold": "kl_mask_threshold",
    "time_sampling_strategy": "time_sampling_strategy", "time_shift": "time_shift",
}


#: Flow-Factory's defaults where flowrl's differ: written out when the input leaves the key unset
FF_DEFAULTS: dict[str, dict[str, Any]] = {
    "*": {"global_std": True, "advantage_aggregation": "gdpo"},
    "grpo": {"clip_range": 1e-4}, "grpo-guard": {"clip_range": 1e-4}, "awm": {"clip_range": 1e-4},
    "dgpo": {"clip_range": 1e-4, "time_sampling_strategy": "discrete", "time_shift": 3.0},
    "nft": {"time_sampling_strategy": "discrete", "time_shift": 3.0},
    "crd": {"time_sampling_strategy": "discrete", "time_shift": 3.0},
    "dpo": {"time_shift": 1.0}, "dppo": {"kl_mask_threshold": 1e-6},
}


def _algorithm_options(c: Conversion, train: dict, trainer_type: str, init: str) -> None:
    from flowrl.algorithms import ALGORITHMS
    from flowrl.fit import options_of

    cls = ALGORITHMS.get(trainer_type)
    options = options_of(cls) if cls is not None else set()
    for key, value in {**FF_DEFAULTS["*"], **FF_DEFAULTS.get(trainer_type, {})}.items():
        option = "advantage_estimator" if key == "advantage_aggregation" else key
        if key not in train and option in options:
            c.put(f"{init}.{option}", {"sum": "group"}.get(value, value))

    def set_option(key: str, option: str, value) -> None:
        if option in options:
            c.put(f"{init}.{option}", value)
            c.note(f"train.{key}", what=f"model.{option}: {value!r}")
        else:
            c.note(f"train.{key}", DROPPED, f"{trainer_type} has no {option} in flowrl (Flow-Factory ignores it too)")

    for key, option in _DIRECT.items():
        if key in train:
            value = train[key]
            if key in ("clip_range", "adv_clip_range") and isinstance(value, (list, tuple)):
                value = [float(v) for v in value]
                value = value[1] if key == "clip_range" and value[0] == -value[1] else value
                value = value[1] if key == "adv_clip_range" and value[0] == -value[1] else value
            set_option(key, option, value)
    if "advantage_aggregation" in train:
        agg = str(train["advantage_aggregation"])
        set_option("advantage_aggregation", "advantage_estimator", {"sum": "group"}.get(agg, agg))
    if trainer_type in DECOUPLED:
        lo, hi = 0.0, train.get("timestep_range", {"nft": 0.9, "awm": 0.9, "dgpo": 0.6}.get(trainer_type, 0.99))
        if isinstance(hi, (list, tuple)):
            lo, hi = float(hi[0]), float(hi[1])
        if lo != 0.0:
            c.note("train.timestep_range", REFUSED, f"timestep_range [{lo}, {hi}]: flowrl trains sigma from 1 down to "
                   "1 - timestep_fraction only; use [0, f]")
        else:
            c.put(f"{init}.timestep_fraction", float(hi))
            if "timestep_range" in train:
                c.note("train.timestep_range", what=f"model.timestep_fraction: {float(hi)}")
        steps = int(train.get("num_train_timesteps", 1 if trainer_type == "dpo" else 0))
        if steps == 0:
            steps = max(1, int(int(train.get("num_inference_steps", 10)) * (hi - lo)))
        c.put(f"{init}.num_train_timesteps", steps)
        if "num_train_timesteps" in train:
            c.note("train.num_train_timesteps", what=f"model.num_train_timesteps: {steps}")
    else:
        for key in ("timestep_range", "num_train_timesteps"):
            if key in train:
                c.note(f"train.{key}", DROPPED, f"{trainer_type} trains sampling steps (scheduler.sde_steps)")
    if trainer_type == "dpo":
        if "beta" in train:
            set_option("beta", "dpo_beta", float(train["beta"]))
        scheme = train.get("weighting_scheme", "logit_normal")
        if "weighting_scheme" in train:
            set_option("weighting_scheme", "time_sampling_strategy", scheme)
        else:
            c.put(f"{init}.time_sampling_strategy", scheme)
        for key, default in (("logit_mean", 0.0), ("logit_std", 1.0)):
            if key in train:
                c.note(f"train.{key}", None if float(train[key]) == default else REFUSED,
                       None if float(train[key]) == default else f"{key}: {train[key]}: flowrl's logit-normal has "
                       f"{key.split('_')[1]} {default}; set {default}")
        if "ref_param_device" in train:
            set_option("ref_param_device", "ref_param_device", _device(train["ref_param_device"]))
    for key, fine in (("clip_kl", False), ("use_old_for_loss", True)):
        if key in train:
            c.note(f"train.{key}", None if bool(train[key]) == fine else REFUSED, None if bool(train[key]) == fine
                   else f"{key}: {train[key]}: flowrl has only {key}: {str(fine).lower()}")
    if "kl_cfg" in train:
        if trainer_type == "crd":
            set_option("kl_cfg", "kl_cfg", float(train["kl_cfg"]))
        else:
            c.note("train.kl_cfg", None if float(train["kl_cfg"]) == 1.0 else REFUSED, None if float(train["kl_cfg"])
                   == 1.0 else f"kl_cfg {train['kl_cfg']}: flowrl's {trainer_type} reference is unguided; set 1.0")
    if trainer_type == "dppo":
        mask = train.get("kl_mask_type", "x-based")
        if "kl_mask_type" in train:
            c.note("train.kl_mask_type", None if mask == "x-based" else REFUSED, None if mask == "x-based" else
                   f"kl_mask_type {mask!r}: flowrl's trust region is on the x-based transition KL")
        if train.get("kl_guidance_scale") is not None:
            c.note("train.kl_guidance_scale", REFUSED, "kl_guidance_scale: flowrl's Flow-DPPO KL uses the rollout's "
                   "guidance; set null")
        elif "kl_guidance_scale" in train:
            c.note("train.kl_guidance_scale")
    if trainer_type == "diffusion-opd" and "teachers" in train:
        teachers = []
        for i, t in enumerate(train["teachers"] or []):
            entry = {"path": t["path"], "name": t.get("name") or f"opd_teacher_{i}"}
            if t.get("guidance_scale") is not None:
                entry["guidance_scale"] = max(1.0, float(t["guidance_scale"]))
            teachers.append(entry)
        c.put(f"{init}.teachers", teachers)
        c.note("train.teachers")
    for key in ("switch_ema_ref", "old_model_decay", "sampling_model_decay", "teacher_param_device", "frame_rate"):
        if key in train:
            c.note(f"train.{key}")
    if "num_frames" in train:
        c.put(f"{init}.policy.num_frames", int(train["num_frames"]))
        c.note("train.num_frames")
    handled = {"trainer_type", "resolution", "height", "width", "max_epochs", "per_device_batch_size",
               "gradient_step_per_epoch", "gradient_accumulation_steps", "unique_sample_num_per_epoch", "group_size",
               "num_inner_epochs", "max_grad_norm", "num_inference_steps", "guidance_scale", "seed", "learning_rate",
               "adam_weight_decay", "adam_betas", "adam_epsilon", "enable_gradient_checkpointing",
               "offload_samples_to_cpu", "latent_storage_dtype", "advantage_aggregation", "timestep_range",
               "num_train_timesteps", "beta", "weighting_scheme", "logit_mean", "logit_std", "clip_kl",
               "use_old_for_loss", "kl_cfg", "kl_mask_type", "kl_guidance_scale", "teachers", "switch_ema_ref",
               "old_model_decay", "sampling_model_decay", "teacher_param_device", "frame_rate", "num_frames",
               "kl_beta", "kl_type", "ref_param_device", "off_policy", "ema_decay", "ema_update_interval", "ema_device",
               "ema_decay_schedule", "flat_steps", "ramp_rate", "warmup_steps", "initial_decay", "total_steps",
               "ema_ref_max_decay", "ema_ref_ramp_rate", "ema_ref_device", *_DIRECT}
    _unknown(c, "train", train, handled)


def _callbacks(c: Conversion, train: dict, trainer_type: str) -> None:
    callbacks: list[dict] = []
    kl_beta = float(train.get("kl_beta", 0.1 if trainer_type == "crd" else 0.0))
    if trainer_type not in ("dpo", "diffusion-opd") and kl_beta > 0:
        kl_type = str(train.get("kl_type", "x-based" if trainer_type in ("grpo", "grpo-guard", "dgpo") else "v-based"))
        if trainer_type in DECOUPLED and kl_type == "x-based":
            approx = (f"v-based (approximate: flowrl's {trainer_type} keeps clean latents, whose KL it takes on the "
                      "velocities)")
            key = "train.kl_type" if "kl_type" in train else "train.kl_beta"
            c.report.append((key, MAPPED, f"callbacks.ReferenceModel(kl_beta: {kl_beta}, kl_type: {approx})"))
            kl_type = "v-based"
        args = {"kl_beta": kl_beta, "kl_type": kl_type,
                "ref_param_device": _device(train.get("ref_param_device", "cuda"))}
        callbacks.append({"class_path": "callbacks.ReferenceModel", "init_args": args})
    for key in ("kl_beta", "kl_type", "ref_param_device"):
        if key in train and not (key == "ref_param_device" and trainer_type == "dpo") and \
                not any(r[0] == f"train.{key}" for r in c.report):
            c.note(f"train.{key}", None if callbacks else DROPPED, None if callbacks else "kl_beta 0: no KL term")
    # One EMA: the reference of DGPO's use_ema_ref (ema_ref_*), else Flow-Factory's EMA (ema_*).
    dgpo_ema = trainer_type == "dgpo" and bool(train.get("use_ema_ref", False))
    own = ("ema_ref_max_decay", "ema_ref_ramp_rate", "ema_ref_device") if dgpo_ema else (
        "ema_decay", "ema_update_interval", "ema_device", "ema_decay_schedule", "flat_steps", "ramp_rate",
        "warmup_steps", "initial_decay", "total_steps")
    if dgpo_ema:
        decay = float(train.get("ema_ref_max_decay", 0.3))
        args = {"ema_decay": decay, "ema_decay_schedule": "piecewise_linear", "flat_steps": 0,
                "ramp_rate": float(train.get("ema_ref_ramp_rate", 0.001)), "ema_update_interval": 1,
                "ema_device": _device(train.get("ema_ref_device", "cuda"))}
    else:
        decay = float(train.get("ema_decay", 0.995))
        args = {"ema_decay": decay, "ema_decay_schedule": str(train.get("ema_decay_schedule", "power")),
                "ema_update_interval": int(train.get("ema_update_interval", 10)),
                "ema_device": _device(train.get("ema_device", "cuda"))}
        for key, name in (("flat_steps", "flat_steps"), ("ramp_rate", "ramp_rate"), ("warmup_steps", "warmup_steps"),
                          ("initial_decay", "initial_decay"), ("total_steps", "decay_steps")):
            if key in train:
                args[name] = train[key]
    if decay > 0:
        callbacks.append({"class_path": "callbacks.EMA", "init_args": args})
    for key in ("ema_decay", "ema_update_interval", "ema_device", "ema_decay_schedule", "flat_steps", "ramp_rate",
                "warmup_steps", "initial_decay", "total_steps", "ema_ref_max_decay", "ema_ref_ramp_rate",
                "ema_ref_device"):
        if key not in train:
            continue
        if key not in own:
            c.note(f"train.{key}", DROPPED, "flowrl's DGPO has one EMA: with use_ema_ref it is the reference's "
                   "(ema_ref_*)" if dgpo_ema else "use_ema_ref false: no reference EMA")
        else:
            c.note(f"train.{key}", None if decay > 0 else DROPPED, None if decay > 0 else "decay 0: no EMA")
    off = bool(train.get("off_policy", False))
    if off and decay > 0:
        callbacks.append({"class_path": "callbacks.OffPolicySampling", "init_args": {"off_policy": True}})
    if "off_policy" in train:
        c.note("train.off_policy", None if off and decay > 0 else DROPPED, None if off and decay > 0 else
               "false (or no EMA): rollouts sample with the live weights")
    if callbacks:
        c.put("trainer.callbacks", callbacks)


def _launcher(c: Conversion, ff: dict, model_type: str) -> None:
    nodes = int(ff.get("num_machines", 1) or 1)
    processes = int(ff.get("num_processes", 1))
    c.put("trainer.devices", max(1, processes // nodes))
    if nodes > 1:
        c.put("trainer.num_nodes", nodes)
    precision = str(ff.get("mixed_precision", "bf16"))
    if precision not in PRECISIONS:
        c.note("mixed_precision", REFUSED, f"mixed_precision {precision!r}: choose bf16, fp16 or no")
    else:
        c.put("trainer.precision", PRECISIONS[precision])
        if "mixed_precision" in ff:
            c.note("mixed_precision")
    for key in ("launcher", "machine_rank", "main_process_ip", "main_process_port", "num_processes", "num_machines"):
        if key in ff:
            c.note(key)
    path = str(ff.get("config_file") or "")
    name = os.path.basename(path).lower()
    if not path:
        if processes > 1:
            c.put("trainer.strategy", "ddp")
        return
    if "fsdp" in name or "zero3" in name:
        c.put("trainer.strategy", {"class_path": "callbacks.FSDP2Strategy"})
        block = FAMILIES.get(model_type)
        fsdp = {"param_dtype": "bfloat16", "reduce_dtype": "float32", **({"blocks": [block]} if block else {})}
        c.put("model.init_args.policy.fsdp", fsdp)
        what = f"trainer.strategy: callbacks.FSDP2Strategy, model.policy.fsdp (from {path}" + \
            (", an approximation of ZeRO-3)" if "zero3" in name else ")")
    else:
        c.put("trainer.strategy", "ddp")
        what = f"trainer.strategy: ddp (from {path}" + (", an approximation of DeepSpeed ZeRO: optimizer state "
                                                       "replicated, not sharded)" if "zero" in name else ")")
    c.note("config_file", what=what)


def _data(c: Conversion, data: dict, config_dir: str, evals: dict) -> None:
    folder = str(data.get("dataset_dir", "data"))
    # Flow-Factory reads dataset_dir from the working directory; a folder found only beside the config is named by
    # its path from here
    if not os.path.isdir(folder) and not os.path.isabs(folder) and os.path.isdir(os.path.join(config_dir, folder)):
        folder = os.path.relpath(os.path.join(config_dir, folder))

    def split(name: str) -> str | None:
        for ext in ("jsonl", "txt"):
            if os.path.isfile(os.path.join(folder, f"{name}.{ext}")):
                return os.path.join(folder, f"{name}.{ext}")
        return None

    train_file = split("train") or os.path.join(folder, "train.txt")
    test_file = split("test")
    c.put("data.train_prompts", train_file)
    if test_file is not None and int(evals.get("eval_freq", 10)) > 0:
        c.put("data.val_prompts", test_file)
    c.note("data.dataset_dir", what=f"data.train_prompts: {train_file}" + (f", data.val_prompts: {test_file}"
                                                                            if test_file else " (no test file found)"))
    if data.get("max_dataset_size") is not None:
        c.put("data.max_train_prompts", int(data["max_dataset_size"]))
    if "max_dataset_size" in data:
        c.note("data.max_dataset_size")
    if "dataloader_num_workers" in data:
        c.put("data.num_workers", int(data["dataloader_num_workers"]))
        c.note("data.dataloader_num_workers")
    for key in ("cache_dir", "preprocessing_batch_size", "enable_preprocess", "force_reprocess",
                "preprocess_parallelism", "sampler_type"):
        if key in data:
            c.note(f"data.{key}")
    image_dir = data.get("image_dir") or (os.path.join(folder, "images") if train_file.endswith(".jsonl") else None)
    if image_dir is not None and os.path.isdir(image_dir):
        c.put("data.image_dir", image_dir)
        c.note("data.image_dir", what=f"data.image_dir: {image_dir}")
    elif data.get("image_dir") is not None:
        c.note("data.image_dir", REFUSED, f"data.image_dir {image_dir!r} is not a folder; fix the path")
    elif "image_dir" in data:
        c.note("data.image_dir", DROPPED, "null: nothing to do")
    for key in ("video_dir", "audio_dir"):
        if key in data:
            c.note(f"data.{key}", DROPPED if data[key] is None else None, "null: nothing to do" if data[key] is None
                   else None)
    _unknown(c, "data", data, {"dataset_dir", "max_dataset_size", "dataloader_num_workers", "cache_dir",
                               "preprocessing_batch_size", "enable_preprocess", "force_reprocess",
                               "preprocess_parallelism", "sampler_type", "image_dir", "video_dir", "audio_dir"})


def _eval(c: Conversion, evals: dict, train: dict, init: str) -> None:
    height, width = _pair(evals.get("resolution", 1024))
    height, width = int(evals.get("height") or height), int(evals.get("width") or width)
    seed = evals.get("seed")
    c.put(f"{init}.eval", {"resolution": [height, width] if height != width else height,
                           "num_inference_steps": int(evals.get("num_inference_steps", 30)),
                           "guidance_scale": max(1.0, float(evals.get("guidance_scale", 3.5))),
                           "seed": int(train.get("seed", 42) if seed is None else seed)})
    c.put("data.val_batch_size", int(evals.get("per_device_batch_size", 1)))
    freq = int(evals.get("eval_freq", 10))
    if freq > 0:
        c.put("trainer.val_check_interval", freq)
        c.put("trainer.check_val_every_n_epoch", None)
    else:
        c.put("trainer.limit_val_batches", 0)
    for key in ("resolution", "height", "width", "per_device_batch_size", "seed", "guidance_scale",
                "num_inference_steps", "eval_freq"):
        if key in evals:
            c.note(f"eval.{key}")
    _unknown(c, "eval", evals, {"resolution", "height", "width", "per_device_batch_size", "seed", "guidance_scale",
                                "num_inference_steps", "eval_freq"})


def _log(c: Conversion, log: dict, model_type: str, finetune: str, trainer_type: str, steps_per_epoch: int) -> None:
    run = log.get("run_name") or f"{model_type}_{finetune}_{trainer_type}"
    root = os.path.join(str(log.get("save_dir", "save")), str(run))
    c.put("trainer.default_root_dir", root)
    backend = str(log.get("logging_backend") or "none").lower()
    if backend == "wandb":
        c.put("trainer.logger", [{"class_path": "lightning.pytorch.loggers.WandbLogger",
                                  "init_args": {"project": str(log.get("project", "Flow-Factory")), "name": str(run),
                                                "save_dir": root}}])
    elif backend == "tensorboard":
        c.put("trainer.logger", [{"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                  "init_args": {"save_dir": root, "name": "logs"}}])
    elif backend == "none":
        c.put("trainer.logger", [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                                  "init_args": {"save_dir": root, "name": "logs"}}])
    else:
        c.note("log.logging_backend", REFUSED, f"logging_backend {backend!r} has no Lightning logger; use wandb, "
               "tensorboard or none")
    if "logging_backend" in log and backend in ("wandb", "tensorboard", "none"):
        c.note("log.logging_backend")
    if "project" in log:
        c.note("log.project", None if backend == "wandb" else DROPPED, None if backend == "wandb" else
               "only W&B has projects")
    freq = int(log.get("save_freq", 10))
    if freq > 0:
        callbacks = c.get("trainer.callbacks") or []
        callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                          "init_args": {"save_last": True, "every_n_train_steps": freq * steps_per_epoch}})
        c.put("trainer.callbacks", callbacks)
    else:
        c.put("trainer.enable_checkpointing", False)
    if "verbose" in log:
        c.put("trainer.enable_progress_bar", bool(log["verbose"]))
    for key in ("run_name", "save_dir", "save_freq", "save_model_only", "verbose"):
        if key in log:
            c.note(f"log.{key}")
    _unknown(c, "log", log, {"run_name", "save_dir", "project", "logging_backend", "save_freq", "save_model_only",
                             "verbose"})


def _rewards(c: Conversion, ff: dict, init: str) -> None:
    for section, option in (("rewards", "rewards"), ("eval_rewards", "eval_rewards")):
        entries = ff.get(section) or []
        entries = [entries] if isinstance(entries, dict) else list(entries)
        out = _reward_entries(c, entries, section, init)
        if out:
            c.put(f"{init}.{option}", out)


def _reward_entries(c: Conversion, entries: list, section: str, init: str) -> list[dict]:
    """The flowrl reward entries of Flow-Factory's ``rewards`` (or ``eval_rewards``) list."""
    out = []
    known = {"name", "reward_model", "weight", "server_url", "timeout", "retry_attempts", "model_name_or_path",
             "async_reward", "dtype", "device", "batch_size", "num_workers", *VLM_ARGS, "api_key", "canonicalize",
             "max_cache_size"}
    for i, entry in enumerate(entries):
        key = f"{section}[{i}]"
        model = entry.get("reward_model")
        if model is None:
            c.report.append((key, DROPPED, "reward_model null: Flow-Factory skips the entry"))
            continue
        label = entry.get("name")
        spec: dict[str, Any] = {"weight": float(entry.get("weight", 1.0))}
        args: dict[str, Any] = {}
        base = str(model).rsplit(".", 1)[-1]
        if base == REMOTE_REWARD:
            spec["name"] = "remote"
            args["url"] = entry.get("server_url")
            for ff_key, name in (("timeout", "timeout"), ("retry_attempts", "retries")):
                if ff_key in entry:
                    args[name] = entry[ff_key]
        elif str(model) == VLM_REWARD:
            spec["name"] = "vlm_judge"
            args["template"] = VLM_TEMPLATE
            args.update({VLM_ARGS[k]: entry[k] for k in VLM_ARGS if k in entry})
        elif str(model).lower() in REWARD_NAMES:
            spec["name"] = REWARD_NAMES[str(model).lower()]
            if "model_name_or_path" in entry:
                args["model_name_or_path"] = entry["model_name_or_path"]
        elif "." in str(model):
            spec = {"class_path": str(model), "weight": spec["weight"]}
        else:
            c.report.append((f"{key}.reward_model", REFUSED, f"reward_model {model!r} has no flowrl reward; use "
                             f"{', '.join(sorted(REWARD_NAMES))}, a remote server or your own class_path"))
            continue
        if args:
            spec["args" if "name" in spec else "init_args"] = args
        if label:
            spec["label"] = str(label)
        out.append(spec)
        if entry.get("async_reward") and section == "rewards":
            c.put(f"{init}.async_rewards", True)
        target = (f"class_path: {spec['class_path']}" if "class_path" in spec else f"name: {spec['name']}")
        for field in sorted(set(entry) & known):
            if field == "async_reward" and section != "rewards":
                c.report.append((f"{key}.{field}", DROPPED, "validation rewards are scored after sampling"))
                continue
            c.note(f"{key}.{field}", what=f"{target} (model.{section}[{len(out) - 1}])" if field == "reward_model"
                   else None)
        _unknown(c, key, entry, known)
    return out


# ---------------------------------------------------------------------------------------------- the command
def rules_table() -> str:
    """The whole mapping as a markdown table (``docs/convert.md``)."""
    lines = ["| Flow-Factory key | treatment | flowrl | note |", "|---|---|---|---|"]
    for key, rule in RULES.items():
        lines.append(f"| `{key}` | {rule.status} | {('`' + rule.target + '`') if rule.target else ''} | "
                     f"{rule.note} |")
    return "\n".join(lines) + "\n"


def report_table(c: Conversion) -> str:
    lines = ["| key | treatment | to / why |", "|---|---|---|"]
    lines += [f"| `{k}` | {s} | {w} |" for k, s, w in c.report]
    return "\n".join(lines) + "\n"


def _output(c: Conversion, source: str) -> str:
    head = (f"# Converted from the Flow-Factory config {source} by `flowrl convert` (every key: `flowrl convert "
            f"{source} --report`).\n")
    return head + yaml.safe_dump(c.out, sort_keys=False, default_flow_style=None)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one ``error:`` line, status 2, like a refused configuration
        raise ConfigError(message)


def convert_main(argv: Sequence[str]) -> str | None:
    """``flowrl convert FF_CONFIG.yaml [-o OUT.yaml] [--report] [--table]``."""
    parser = _Parser(prog="flowrl convert", description="Turn a Flow-Factory YAML config into a flowrl config.")
    parser.add_argument("config", nargs="?", help="the Flow-Factory YAML config")
    parser.add_argument("-o", "--out", help="the flowrl config to write (default: print it)")
    parser.add_argument("--report", action="store_true", help="print what became of every key")
    parser.add_argument("--table", action="store_true", help="print the whole mapping table (docs/convert.md)")
    args = parser.parse_args(list(argv))
    if args.table:
        sys.stdout.write(rules_table())
        return None
    if not args.config:
        parser.error("give the Flow-Factory config to convert")
    if not os.path.isfile(args.config):
        raise ConfigError(f"{args.config!r} does not exist")
    try:
        ff = yaml.safe_load(open(args.config, encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{args.config!r} is not YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(ff, dict):
        raise ConfigError(f"{args.config!r} is not a Flow-Factory config (a mapping of sections)")
    c = convert(ff, os.path.dirname(os.path.abspath(args.config)))
    if args.report:
        sys.stdout.write(report_table(c))
    if c.refused:
        listing = "; ".join(f"{k}: {w}" for k, _, w in c.refused)
        raise ConfigError(f"{args.config}: {len(c.refused)} key(s) have no flowrl equivalent, nothing written: "
                          f"{listing}")
    text = _output(c, args.config)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        counts = {s: sum(1 for r in c.report if r[1] == s) for s in (MAPPED, DROPPED)}
        print(f"wrote {args.out}: {counts[MAPPED]} keys mapped, {counts[DROPPED]} dropped (--report lists them)")
    elif not args.report:
        sys.stdout.write(text)
    return text
