"""Which ``Trainer(precision=...)`` a CPU run should use, chosen by timing the run's own denoiser.

Whether bf16 autocast is faster than float32 on a CPU cannot be read from its flags: with AVX512-BF16 it was 1.2x
faster on an AMD EPYC and 1.2x slower on an Intel Xeon (no AMX); on AVX2-only CPUs, where bf16 is emulated, 5x
slower. So a CPU run with no ``trainer.precision`` set times a few forward+backward passes of its own denoiser at
its own shapes (one micro-batch at the training resolution) in float32 and under bf16 autocast, and runs the
faster (bf16 only when at least 5% faster: it rounds every activation, and a near tie is noise). The two times and the choice are logged and written into the run's saved ``config.yaml``;
``--trainer.precision`` overrides. The result is cached per CPU model, thread count, torch version and shape
(``$XDG_CACHE_HOME/flowrl/precision.json``, else ``~/.cache/...``), so a second run does not pay the second or
two. Extra processes of a multi-process run read the first one's choice (``FLOWRL_CPU_PRECISION``) instead of
timing on their own, so every process runs the same numerics.

Python users call :func:`cpu_precision` with their module for their own Trainer. Lightning has no such choice
(its CPU default is always ``32-true``), hence this small module.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["PrecisionChoice", "cpu_description", "cpu_has_native_bf16", "cpu_precision", "measure_precision",
           "needs_choice"]

CANDIDATES = ("32-true", "bf16-mixed")
BF16_MARGIN = 1.05  # bf16 autocast is chosen only when at least 5% faster than float32
ENV = "FLOWRL_CPU_PRECISION"  # the choice, handed to the other processes of a multi-process run


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions (AVX512-BF16 or AMX tiles); recorded beside timings, not a rule."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def cpu_description() -> dict[str, str | bool]:
    """What to record beside a CPU timing: the model name, torch's vector capability and native bf16."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"model_name": name, "capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": cpu_has_native_bf16(), "threads": str(torch.get_num_threads())}


def needs_choice(precision, accelerator) -> bool:
    """Whether flowrl chooses the precision: none set, and the run is on the CPU."""
    if precision is not None:
        return False
    if accelerator is None or (isinstance(accelerator, str) and accelerator == "auto"):
        return not (torch.cuda.is_available() or torch.backends.mps.is_available())
    return isinstance(accelerator, str) and accelerator == "cpu"


@dataclass(frozen=True)
class PrecisionChoice:
    """The faster precision, the seconds of one forward+backward pass in each, and where they came from."""

    chosen: str
    seconds: dict[str, float]
    source: str  # "measured", "cached" or "inherited"

    def line(self) -> str:
        info = cpu_description()
        if self.source == "inherited":
            return f"flowrl: trainer.precision not set; {self.chosen}, as the first process of this run measured."
        times = ", ".join(f"{p} {s * 1000:.0f} ms" for p, s in self.seconds.items())
        other = next(p for p in self.seconds if p != self.chosen)
        ratio = self.seconds[other] / max(self.seconds[self.chosen], 1e-12)
        why = f"{ratio:.2f}x faster" if ratio > 1 else f"bf16 not {BF16_MARGIN - 1:.0%} faster"
        return (f"flowrl: trainer.precision not set; on this CPU ({info['model_name']}, {info['capability']}, "
                f"{info['threads']} threads) one forward+backward pass of this run's denoiser took {times} "
                f"({self.source}): running {self.chosen} ({why}). Set --trainer.precision to override.")


def _cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "flowrl" / "precision.json"


def _shape_key(policy, batch_size: int, height: int, width: int) -> str:
    info = cpu_description()
    params = sum(p.numel() for p in policy.transformer.parameters())
    trained = sum(p.numel() for p in policy.trainable_parameters())
    latent = tuple(policy.adapter.latent_shape(height, width))
    return (f"{info['model_name']}|{info['capability']}|threads={info['threads']}|torch={torch.__version__}|"
            f"{type(policy.transformer).__name__}|params={params}|trained={trained}|batch={batch_size}|latent={latent}")


def _read_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, seconds: dict[str, float]) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_cache()
        entries[key] = seconds
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, path)  # readers never see half a file
    except OSError:  # a read-only home: the choice is still made, only not remembered
        pass


def _time_passes(policy, precision: str, batch_size: int, height: int, width: int, repeats: int) -> float:
    """The fastest of ``repeats`` forward+backward passes (after one warm-up) of ``policy``'s denoiser on one
    micro-batch, in ``precision``. Gradients are dropped afterwards; no global random state is used."""
    gen = torch.Generator().manual_seed(0)
    latents = policy.prepare_latents(batch_size, height, width, gen)
    low, _ = policy.adapter.condition_images
    if low:  # an image-to-video / editing family: grey condition images of the output size, as a row would give
        from flowrl.conditions import ConditionImages

        grey = ConditionImages.from_tensors(torch.full((low, 3, height, width), 0.5))
        cond = policy.encode_prompt(["a photo"] * batch_size, [grey] * batch_size, height, width)
    else:
        cond = policy.encode_prompt(["a photo"] * batch_size)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed"
                else contextlib.nullcontext())
    params = list(policy.trainable_parameters())
    best = float("inf")
    try:
        for i in range(repeats + 1):
            start = time.perf_counter()
            with autocast:
                v = policy.velocity(latents, 0.7, cond)
            v.float().square().mean().backward()
            if i:  # the first pass is the warm-up
                best = min(best, time.perf_counter() - start)
    finally:
        for p in params:
            p.grad = None
    return best


def measure_precision(policy, batch_size: int, height: int, width: int, repeats: int = 3,
                      use_cache: bool = True) -> PrecisionChoice:
    """Times ``policy``'s denoiser in float32 and bf16 autocast (alternating, the fastest of ``repeats`` each) and
    returns the faster; a cached measurement of the same CPU and shapes is used instead when there is one."""
    inherited = os.environ.get(ENV)
    if inherited in CANDIDATES:
        return PrecisionChoice(inherited, {}, "inherited")
    key = _shape_key(policy, batch_size, height, width)
    cached = _read_cache().get(key) if use_cache else None
    if isinstance(cached, dict) and set(cached) == set(CANDIDATES):
        seconds, source = {p: float(cached[p]) for p in CANDIDATES}, "cached"
    else:
        seconds = {p: float("inf") for p in CANDIDATES}
        for _ in range(repeats):  # alternated, so a slow moment of the machine does not favour one
            for p in CANDIDATES:
                seconds[p] = min(seconds[p], _time_passes(policy, p, batch_size, height, width, 1))
        source = "measured"
        if use_cache:
            _write_cache(key, seconds)
    # bf16 rounds every activation: it must earn that by a clear margin, else float32 (a near tie is noise)
    chosen = "bf16-mixed" if seconds["bf16-mixed"] * BF16_MARGIN < seconds["32-true"] else "32-true"
    return PrecisionChoice(chosen, seconds, source)


def cpu_precision(module=None) -> str:
    """The faster precision of this CPU for ``module`` (a flowrl algorithm module: its policy, micro-batch and
    resolution are timed, see :func:`measure_precision`). Without a module there is nothing to time: ``"32-true"``,
    never slow (bf16 autocast is emulated, and about 5x slower, on CPUs without bf16 instructions)."""
    if module is None:
        return "32-true"
    return measure_precision(module.policy, module.train_batch_size, module.height, module.width).chosen
