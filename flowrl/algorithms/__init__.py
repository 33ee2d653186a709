"""The algorithms: LightningModules sharing one policy, one rollout loop and one update loop."""

from flowrl.algorithms.awm import AWM
from flowrl.algorithms.base import EvalConfig, FlowRLModule
from flowrl.algorithms.crd import CRD
from flowrl.algorithms.decoupled import DecoupledModule
from flowrl.algorithms.dgpo import DGPO
from flowrl.algorithms.dpo import DiffusionDPO, OfflineDPO
from flowrl.algorithms.dppo import FlowDPPO
from flowrl.algorithms.grpo import GRPO
from flowrl.algorithms.grpo_guard import GRPOGuard
from flowrl.algorithms.nft import NFT
from flowrl.algorithms.opd import DiffusionOPD, Teacher
from flowrl.rollout import Rollout

ALGORITHMS: dict[str, type[FlowRLModule]] = {"grpo": GRPO, "grpo-guard": GRPOGuard, "nft": NFT, "awm": AWM,
                                             "dppo": FlowDPPO, "dgpo": DGPO, "crd": CRD,
                                             "dpo": DiffusionDPO, "dpo-offline": OfflineDPO,
                                             "diffusion-opd": DiffusionOPD}

__all__ = ["ALGORITHMS", "AWM", "CRD", "DGPO", "DecoupledModule", "DiffusionDPO", "DiffusionOPD", "EvalConfig",
           "FlowDPPO", "FlowRLModule", "GRPO", "GRPOGuard", "NFT", "OfflineDPO", "Rollout", "Teacher"]
