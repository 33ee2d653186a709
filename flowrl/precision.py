"""Which ``Trainer(precision=...)`` a CPU run should use: bf16 autocast only where the CPU computes bf16 natively.

On a CPU with AVX512-BF16 or AMX, bf16 autocast runs the toy model 1.2-1.6x faster than float32 (measured on
CPUs of the CI kind); on an AVX2-only CPU it is emulated and 5-6x slower. So CPU configs leave ``trainer.precision`` unset and
``flowrl fit`` picks it here at start-up (logged, and written into the run's saved ``config.yaml``);
set ``--trainer.precision`` to override. Python users call :func:`cpu_precision` for their own Trainer.
Lightning has no such choice (its CPU default is always ``32-true``), hence this small module.
"""

from __future__ import annotations

import platform

import torch

__all__ = ["cpu_has_native_bf16", "cpu_precision", "cpu_description", "resolve_precision"]


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions (AVX512-BF16 or AMX tiles) that oneDNN uses for bf16 matmuls."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def cpu_precision() -> str:
    """``"bf16-mixed"`` on a CPU with native bf16, else ``"32-true"``."""
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


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


def _runs_on_cpu(accelerator) -> bool:
    if accelerator is None or (isinstance(accelerator, str) and accelerator == "auto"):
        return not (torch.cuda.is_available() or torch.backends.mps.is_available())
    return isinstance(accelerator, str) and accelerator == "cpu"


def resolve_precision(precision, accelerator) -> tuple[object, str | None]:
    """The precision to run with, and a line saying why when it was chosen here.

    An explicit ``precision`` is kept. Unset (None) on a CPU run, it becomes :func:`cpu_precision`;
    unset elsewhere it stays None (Lightning's default)."""
    if precision is not None or not _runs_on_cpu(accelerator):
        return precision, None
    chosen = cpu_precision()
    info = cpu_description()
    why = (f"flowrl: trainer.precision not set; this CPU ({info['model_name']}, {info['capability']}, native bf16: "
           f"{'yes' if info['native_bf16'] else 'no'}) runs {chosen}. Set --trainer.precision to override.")
    return chosen, why
