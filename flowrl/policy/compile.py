"""``policy.compile``: regional ``torch.compile`` of the denoiser's repeated blocks, exact where a ratio needs it.

Regional compilation (diffusers' ``ModelMixin.compile_repeated_blocks``) compiles the transformer's repeated block
(``JointTransformerBlock`` for SD3, ``FluxTransformerBlock`` + ``FluxSingleTransformerBlock`` for FLUX ...) once and
reuses the compiled code for every block of that class, so compile time does not grow with depth. The blocks are
the ones the model declares (diffusers' ``_repeated_blocks``, else ``_no_split_modules``, as FSDP2 sharding reads
them). flowrl compiles them itself rather than with ``compile_repeated_blocks`` for two reasons: one compiled function
is shared by every block (one cache, counted below), and a ``deepcopy`` of a block (a distillation teacher copied
from the policy) runs eagerly with its own weights instead of calling back into the original block.

A compiled graph is not bit-identical to eager (a few ulps), and a graph compiled for inference (no autograd) is not
guaranteed to match the forward of a graph compiled for training. A ratio ``exp(log_prob - log_prob_old)`` is exactly
1 on the first update only if the rollout and the update compute a trained step the same way, so the modes say
which calls run compiled, and how:

* ``rollout``: only the sampling steps that training never recomputes run compiled (inference graphs): the ODE steps
  of a GRPO-family rollout, every step of an NFT / AWM / DPO-family rollout, validation and ``flowrl sample``. The
  trained SDE steps, the frozen velocities of the decoupled trainers and every training forward and backward run
  eagerly, exactly as without compilation. Exact by construction; the training pass gets no speed-up.
* ``all``: every denoiser call runs compiled. A call that training recomputes (a trained SDE step of the rollout,
  the old/EMA/reference velocities of the decoupled trainers) runs through the training graph (autograd on, the
  graph dropped right after), so it is the very computation the update repeats; the untrained sampling steps use
  inference graphs. The first update's ratio is again exactly 1 (``tests/algorithms/test_compile_ratios.py``). The
  price: those no-grad calls hold one micro-batch's activations for the moment of the call, as training does.

Which sampling steps are "untrained" the sampler says (:meth:`FlowMatchingPolicy.denoising_step`); every other call
counts as one training recomputes. Eager calls under ``rollout`` run with ``torch.compiler.set_stance("force_eager")``.

Shapes: graphs are static (``dynamic=False``): a run uses a few shapes (the rollout's batch with and without the CFG
branch, the training micro-batch, the validation size), each compiled once, together with the grad mode, train/eval
flag, autocast and LoRA on/off state it meets. Each policy's blocks keep their own graphs (``isolate_recompiles``),
at most 64: past that a new shape runs eagerly under ``rollout`` (harmless there) and raises under ``all``, where a
silent eager fallback would break the exactness.
``perf/compiled_graphs``, ``perf/recompiles`` (graphs compiled after the first compiling call: it should stop
growing after the first iteration and validation) and ``perf/compile_seconds`` (torch's own account, forward and
backward graphs) are logged each iteration; each call that compiles prints one line with its time.

Gradient checkpointing composes with it (the checkpointed block runs the same compiled graph; the gradients equal
those without checkpointing, tested), and so does FSDP2 sharding (its hooks break each block's graph into a few;
ratios exactly 1 tested on a one-process mesh; several GPUs untested).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable

import torch
from torch import nn

from flowrl.errors import ConfigError

__all__ = ["COMPILE_MODES", "RegionalCompile", "check_compile_mode", "repeated_block_names"]

COMPILE_MODES = ("rollout", "all")
_RECOMPILE_LIMIT = 64


def check_compile_mode(mode: str | None) -> None:
    """Refuses an unknown mode, and any mode on a torch without what the modes rely on (checked before loading)."""
    if mode is None:
        return
    if mode not in COMPILE_MODES:
        raise ConfigError(f"policy.compile={mode!r}; choose rollout (the untrained sampling steps only), all (every "
                          "denoiser call, training included) or null (eager)")
    if "isolate_recompiles" not in inspect.signature(torch.compile).parameters or \
            not hasattr(torch.compiler, "set_stance"):
        raise ConfigError(f"policy.compile needs torch.compile(isolate_recompiles=...) and torch.compiler.set_stance, "
                          f"which torch {torch.__version__} lacks (2.13 has both); upgrade torch or set "
                          "policy.compile: null")


def repeated_block_names(transformer: nn.Module) -> list[str]:
    """Class names of ``transformer``'s repeated blocks as the model declares them, those present in it."""
    declared = list(getattr(transformer, "_repeated_blocks", None) or
                    getattr(transformer, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in transformer.modules()}
    found = [name for name in declared if name in present]
    if not found:
        raise ConfigError(f"policy.compile: {type(transformer).__name__} declares no repeated blocks to compile "
                          f"(_repeated_blocks / _no_split_modules: {declared}); set policy.compile: null")
    return found


class _CompiledCall:
    """A block's ``_compiled_call_impl`` (what ``nn.Module.__call__`` runs when set): the shared compiled
    ``Module._call_impl`` applied to this block. A deepcopy (or pickled copy) of the block gets none, so the copy runs
    eagerly on its own weights (``nn.Module.compile`` stores a closure over the original block, which a copy would
    call)."""

    __slots__ = ("fn", "module")

    def __init__(self, fn: Callable, module: nn.Module):
        self.fn, self.module = fn, module

    def __call__(self, *args, **kwargs):
        return self.fn(self.module, *args, **kwargs)

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):  # a pickled block (torch.save of the module, a spawned process) comes back eager too
        return type(None), ()


def _frames_compiled() -> int:
    from torch._dynamo.utils import counters

    return counters["frames"]["ok"]


def _compile_seconds() -> float:
    from torch._dynamo.utils import calculate_time_spent

    return float(calculate_time_spent().get("total_wall_time", 0.0))


class RegionalCompile:
    """The compiled blocks of one denoiser and the rule of which calls run them (see the module docstring).

    Args:
        transformer: the denoiser; its repeated blocks are compiled in place (lazily: at their first call).
        mode: ``rollout`` or ``all``.
    """

    def __init__(self, transformer: nn.Module, mode: str):
        check_compile_mode(mode)
        import torch._dynamo  # (used by __call__ too)

        self.mode = mode
        self.block_names = repeated_block_names(transformer)
        compiled = torch.compile(nn.Module._call_impl, dynamic=False, recompile_limit=_RECOMPILE_LIMIT,
                                 isolate_recompiles=True)
        for module in transformer.modules():
            if type(module).__name__ in self.block_names:
                module._compiled_call_impl = _CompiledCall(compiled, module)
        self.graphs = 0  # graphs compiled by this denoiser's calls
        self.first_graphs: int | None = None  # ... by its first call that compiled anything
        self._seconds_at_start = _compile_seconds()

    def __call__(self, forward: Callable[[], torch.Tensor], inference: bool, shape=()) -> torch.Tensor:
        """``forward()`` (the denoiser call) run compiled or eagerly. ``inference``: a sampling step that training
        never recomputes."""
        if not inference and self.mode == "rollout":
            with torch.compiler.set_stance("force_eager"):
                return forward()
        # a call training recomputes runs through the training graph, whatever the caller's grad mode
        as_training = not inference and not torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        before, start = _frames_compiled(), time.perf_counter()
        strict = torch._dynamo.config.patch(fail_on_recompile_limit_hit=self.mode == "all")
        try:
            with strict, torch.enable_grad() if as_training else contextlib.nullcontext():
                out = forward()
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            raise RuntimeError(f"policy.compile: all needs more than {_RECOMPILE_LIMIT} graphs of "
                               f"{', '.join(self.block_names)} (shapes, grad modes ...), and running the rest eagerly "
                               "would break the rollout/update exactness; use policy.compile: rollout") from None
        new = _frames_compiled() - before
        if new:
            graph = "training" if as_training or torch.is_grad_enabled() else "inference"
            self._report(new, time.perf_counter() - start, graph, shape)
        return out.detach() if as_training else out

    def _report(self, new: int, seconds: float, graph: str, shape) -> None:
        from lightning.pytorch.utilities import rank_zero_info

        self.graphs += new
        if self.first_graphs is None:
            self.first_graphs = new
        rank_zero_info(f"[flowrl] torch.compile of {', '.join(self.block_names)}: {new} {graph} graph(s) for latents "
                       f"{list(shape)} in {seconds:.1f} s (graphs so far: {self.graphs})")

    @property
    def recompiles(self) -> int:
        """Graphs compiled after the first compiling call (a new shape, grad mode, train/eval flag ...)."""
        return self.graphs - (self.first_graphs or 0)

    def stats(self) -> dict[str, float]:
        """``perf/compiled_graphs``, ``perf/recompiles`` and ``perf/compile_seconds`` (torch's account of its compile
        time since these blocks were set up, forward and backward graphs; process-wide)."""
        return {"perf/compiled_graphs": float(self.graphs), "perf/recompiles": float(self.recompiles),
                "perf/compile_seconds": _compile_seconds() - self._seconds_at_start}
