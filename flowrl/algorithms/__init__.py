"""The algorithms: LightningModules sharing one policy, one rollout loop and one update loop."""

from flowrl.algorithms.awm import AWM
from flowrl.algorithms.base import EvalConfig, FlowRLModule, Rollout
from flowrl.algorithms.decoupled import DecoupledModule
from flowrl.algorithms.grpo import GRPO
from flowrl.algorithms.nft import NFT
from flowrl.algorithms.grpo_guard import GRPOGuard

ALGORITHMS: dict[str, type[FlowRLModule]] = {"grpo": GRPO, "grpo-guard": GRPOGuard}

__all__ = ["ALGORITHMS", "EvalConfig", "FlowRLModule", "GRPO", "GRPOGuard", "Rollout"]
