"""The algorithms: LightningModules sharing one policy, one rollout loop and one update loop."""

from flowrl.algorithms.base import EvalConfig, FlowRLModule, Rollout
from flowrl.algorithms.grpo import GRPO

ALGORITHMS: dict[str, type[FlowRLModule]] = {"grpo": GRPO}

__all__ = ["ALGORITHMS", "EvalConfig", "FlowRLModule", "GRPO", "Rollout"]
