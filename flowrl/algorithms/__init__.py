"""The algorithms: LightningModules sharing one policy, one rollout loop and one update loop."""

from flowrl.algorithms.awm import AWM
from flowrl.algorithms.base import EvalConfig, FlowRLModule
from flowrl.algorithms.decoupled import DecoupledModule
from flowrl.algorithms.grpo import GRPO
from flowrl.algorithms.grpo_guard import GRPOGuard
from flowrl.algorithms.nft import NFT
from flowrl.rollout import Rollout

ALGORITHMS: dict[str, type[FlowRLModule]] = {"grpo": GRPO, "grpo-guard": GRPOGuard, "nft": NFT, "awm": AWM}

__all__ = ["ALGORITHMS", "AWM", "DecoupledModule", "EvalConfig", "FlowRLModule", "GRPO", "GRPOGuard", "NFT", "Rollout"]
