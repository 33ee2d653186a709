"""The policy: a diffusers pipeline wrapped as a trainable velocity field, one adapter per family."""

from flowrl.policy import sd3  # noqa: F401  (registers the SD3 adapter)
from flowrl.policy.adapter import Conditioning, ModelAdapter, adapter_for, register_adapter
from flowrl.policy.policy import FlowMatchingPolicy, PolicyConfig, resolve_model_path

__all__ = [
    "Conditioning",
    "FlowMatchingPolicy",
    "ModelAdapter",
    "PolicyConfig",
    "adapter_for",
    "register_adapter",
    "resolve_model_path",
]
