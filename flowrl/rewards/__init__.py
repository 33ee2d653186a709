"""Rewards: a protocol, a registry, built-ins and a weighted multi-reward."""

from flowrl.rewards.base import (
    Reward,
    RewardError,
    RewardScores,
    RewardSpec,
    WeightedReward,
    available_rewards,
    build_reward,
    register_reward,
)
from flowrl.rewards.jpeg import JpegCompressibility, JpegIncompressibility

__all__ = [
    "Reward",
    "RewardError",
    "RewardScores",
    "RewardSpec",
    "WeightedReward",
    "available_rewards",
    "build_reward",
    "register_reward",
    "JpegCompressibility",
    "JpegIncompressibility",
]
