"""The policy: a diffusers pipeline wrapped as a trainable velocity field, one adapter per family.

Every module of this package other than the shared ones is a family's adapter file; importing the
package registers them all (so adding a family is adding one file)."""

import importlib
import pkgutil

from flowrl.policy.adapter import Conditioning, ModelAdapter, adapter_for, register_adapter
from flowrl.policy.policy import FlowMatchingPolicy, PolicyConfig, resolve_model_path

_SHARED = {"adapter", "policy", "tiny"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SHARED and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Conditioning",
    "FlowMatchingPolicy",
    "ModelAdapter",
    "PolicyConfig",
    "adapter_for",
    "register_adapter",
    "resolve_model_path",
]
