"""FSDP2 for the policy: the denoiser's repeated blocks and then the denoiser itself sharded with ``fully_shard``.

Used under Lightning's ``ModelParallelStrategy`` (or :class:`callbacks.FSDP2Strategy`), whose device mesh the
module's ``configure_model`` passes here. Which blocks: the transformer's own declaration of its repeated blocks
(diffusers' ``_repeated_blocks``, else ``_no_split_modules``: ``JointTransformerBlock`` for SD3,
``FluxTransformerBlock`` + ``FluxSingleTransformerBlock`` for FLUX, ...), or ``blocks`` by class name. The frozen
VAE and text encoders are not sharded: each process keeps them whole (they run under ``no_grad`` once a batch).

Each block is one all-gather unit: its parameters live as DTensor shards (``Shard(0)``), gathered for its forward
and backward and freed after; gradients are reduce-scattered, so each process holds and optimizes only its shard
of the parameters, the gradients and the optimizer state. The frozen LoRA base is sharded like the adapters.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from flowrl.errors import ConfigError

__all__ = ["FullyShard", "check_sharding", "is_sharded", "shard_policy", "sharded_block_classes"]

_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class FullyShard:
    """How ``fully_shard`` wraps the denoiser (``policy.fsdp``; only under a sharding strategy).

    Args:
        param_dtype: dtype the parameters are gathered in and computed with (FSDP2's mixed precision:
            ``bfloat16`` halves the all-gather traffic); the sharded parameters, gradients after reduction and the
            optimizer state stay in their own dtype (float32 for trained weights). null = the parameters' dtype.
        reduce_dtype: dtype of the gradient reduce-scatter (float32: the sum over processes is not rounded to
            bf16); null = ``param_dtype``.
        cpu_offload: keep the sharded parameters, gradients and optimizer state in host memory (FSDP2's
            ``CPUOffloadPolicy``); each block is copied to the accelerator for its forward and backward.
        reshard_after_forward: free each block's gathered parameters after its forward (gathered again for the
            backward: less memory, more communication); false keeps them until the backward.
        blocks: class names of the modules that are one sharding unit each; null = the transformer's repeated
            blocks as diffusers declares them.
    """

    param_dtype: str | None = None
    reduce_dtype: str | None = "float32"
    cpu_offload: bool = False
    reshard_after_forward: bool = True
    blocks: list[str] | None = None

    def __post_init__(self):
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if value is not None and value not in _DTYPES:
                raise ConfigError(f"policy.fsdp.{name}={value!r}; choose {', '.join(_DTYPES)} or null")


def is_sharded(module: nn.Module) -> bool:
    """True when ``module`` (or a submodule) was wrapped by ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def sharded_block_classes(transformer: nn.Module, names: list[str] | None = None) -> list[type]:
    """The classes of ``transformer``'s modules that are sharded one by one; a clear error when none is found."""
    declared = list(names or getattr(transformer, "_repeated_blocks", None) or
                    getattr(transformer, "_no_split_modules", None) or [])
    present = {c.__name__: c for m in transformer.modules() for c in type(m).__mro__}  # FSDP2 subclasses them
    found = [present[n] for n in declared if n in present]
    if not found:
        candidates = sorted({type(c[0]).__name__ for c in transformer.modules() if isinstance(c, nn.ModuleList)
                             and len(c) and not type(c[0]).__module__.startswith("torch.")})
        raise ConfigError(
            f"FSDP2 finds no block to shard in {type(transformer).__name__}: "
            + (f"none of {declared} is one of its modules" if declared else "it declares no repeated blocks")
            + f"; set policy.fsdp.blocks to class names of its repeated blocks, e.g. {candidates[:6]}")
    return found


def check_sharding(policy: nn.Module, strategy) -> None:
    """Before any process starts: ``policy.fsdp`` set under a strategy that does not shard (it would do nothing),
    or a sharding strategy on a denoiser whose blocks are not found, is a configuration error."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if not isinstance(strategy, ModelParallelStrategy):
        if getattr(policy, "fsdp", None) is not None:
            raise ConfigError(
                f"policy.fsdp does nothing under strategy {type(strategy).__name__}; use trainer.strategy: "
                "callbacks.FSDP2Strategy (lightning_configs/strategies/fsdp2_<family>.yaml) or leave policy.fsdp out")
        return
    sharded_block_classes(policy.transformer, (policy.fsdp or FullyShard()).blocks)


def shard_policy(policy: nn.Module, mesh, config: FullyShard) -> None:
    """``fully_shard`` every block of ``policy.transformer`` (see the module docstring), then the transformer.
    Called once, from ``configure_model``; a second call does nothing."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    transformer = policy.transformer
    if is_sharded(transformer):
        return
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ConfigError("flowrl shards with FSDP2 only (no tensor parallelism): set the strategy's "
                          "tensor_parallel_size: 1 (callbacks.FSDP2Strategy does)")
    mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
    classes = tuple(sharded_block_classes(transformer, config.blocks))
    dtype = lambda name: None if name is None else getattr(torch, name)  # noqa: E731
    kwargs = {"mesh": mesh, "reshard_after_forward": config.reshard_after_forward,
              "mp_policy": MixedPrecisionPolicy(param_dtype=dtype(config.param_dtype),
                                                reduce_dtype=dtype(config.reduce_dtype))}
    if config.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu")  # pinning needs a GPU
    for module in [m for m in transformer.modules() if isinstance(m, classes)]:
        fully_shard(module, **kwargs)
    fully_shard(transformer, **kwargs)
    # FSDP2 warns at every block whose output is a view, in case the caller edits it in place (that would skip a
    # gradient all-gather); flowrl never does: the families' contract compares sharded and whole gradients.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")
