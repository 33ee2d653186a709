"""The reward protocol, the reward registry and the weighted sum of rewards."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from flowrl.errors import ConfigError


@runtime_checkable
class Reward(Protocol):
    """Scores a batch of generated samples.

    ``images`` is a float tensor in [0, 1]: ``(B, C, H, W)`` for images or ``(B, T, C, H, W)`` for
    videos. ``prompts`` has ``B`` entries. Returns a float32 tensor of ``B`` scores (higher is better).
    """

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


_REGISTRY: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str) -> Callable:
    """Class/function decorator: makes a reward buildable by ``name`` from configs."""

    def wrap(factory):
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ConfigError(f"reward name {name!r} is already registered by {_REGISTRY[name]!r}")
        _REGISTRY[name] = factory
        return factory

    return wrap


def available_rewards() -> list[str]:
    _import_builtins()
    return sorted(_REGISTRY)


def build_reward(name: str, **kwargs: Any) -> Reward:
    _import_builtins()
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown reward {name!r}; registered rewards are {sorted(_REGISTRY)}. "
            "Register your own with @flowrl.rewards.register_reward('name')."
        )
    return _REGISTRY[name](**kwargs)


def _import_builtins() -> None:
    # Built-in rewards register themselves on import.
    from flowrl.rewards import jpeg  # noqa: F401
    from flowrl.toy import verifier  # noqa: F401


@dataclass
class RewardSpec:
    """One term of the reward: a registered reward ``name``, its ``weight`` and its constructor ``args``."""

    name: str
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)


class WeightedReward:
    """``sum_i weight_i * reward_i(images, prompts)``; also exposes each term for logging.

    A reward that returns NaN/inf or the wrong shape raises instead of silently corrupting training.
    """

    def __init__(self, rewards: Mapping[str, Reward], weights: Mapping[str, float]):
        if not rewards:
            raise ConfigError("WeightedReward needs at least one reward")
        if set(rewards) != set(weights):
            raise ConfigError(f"reward names {sorted(rewards)} and weight names {sorted(weights)} differ")
        self.rewards = dict(rewards)
        self.weights = {k: float(v) for k, v in weights.items()}
        self.last_terms: dict[str, torch.Tensor] = {}

    @classmethod
    def from_specs(cls, specs: Sequence[RewardSpec | Mapping[str, Any]]) -> WeightedReward:
        rewards, weights = {}, {}
        for spec in specs:
            spec = spec if isinstance(spec, RewardSpec) else RewardSpec(**spec)
            if spec.name in rewards:
                raise ConfigError(f"reward {spec.name!r} is listed twice; merge the entries into one weight")
            rewards[spec.name] = build_reward(spec.name, **spec.args)
            weights[spec.name] = spec.weight
        return cls(rewards, weights)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        total = torch.zeros(len(prompts), dtype=torch.float32)
        self.last_terms = {}
        for name, reward in self.rewards.items():
            scores = torch.as_tensor(reward(images, prompts)).detach().to("cpu", torch.float32)
            if scores.shape != (len(prompts),):
                raise ValueError(f"reward {name!r} returned shape {tuple(scores.shape)}, expected ({len(prompts)},)")
            if not torch.isfinite(scores).all():
                raise FloatingPointError(
                    f"reward {name!r} returned non-finite scores {scores.tolist()}; fix the reward "
                    "(training stops here so that no update is made from a broken reward)"
                )
            self.last_terms[name] = scores
            total += self.weights[name] * scores
        return total
