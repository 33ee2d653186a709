"""The reward protocol, reward specs and the weighted sum of rewards (the registry is flowrl.rewards.registry)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from flowrl.errors import ConfigError
from flowrl.imports import import_class_path
from flowrl.rewards.registry import available_rewards, build_reward, register_reward  # noqa: F401 (re-exported)


@runtime_checkable
class Reward(Protocol):
    """Scores a batch of generated samples.

    ``images`` is a float tensor in [0, 1]: ``(B, C, H, W)`` for images or ``(B, T, C, H, W)`` for
    videos. ``prompts`` has ``B`` entries. Returns a float32 tensor of ``B`` scores (higher is better).

    A reward with the class attribute ``uses_condition_images = True`` is also given ``condition_images=``: one
    entry per sample, the :class:`flowrl.conditions.ConditionImages` it was generated from (a sequence of float32
    ``(3, H, W)`` tensors in [0, 1], with ``.caption``), or None where a sample has none (text-to-image).
    """

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, C, H, W)`` floats in [0, 1] -> ``(B, H, W, C)`` uint8, the 8-bit pictures the samples would be saved as."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return np.ascontiguousarray(arr)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``(B, C, H, W)`` floats in [0, 1] -> PIL images (RGB, or grey for one channel)."""
    return [Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a) for a in to_uint8(images)]


@dataclass
class RewardSpec:
    """One term of the reward and its ``weight``: a registered reward ``name`` with constructor ``args``
    (``{name: shapes}``), or any class by its import path, the Lightning way
    (``{class_path: mypkg.MyReward, init_args: {...}, weight: 0.5}``). ``label`` names the term in logs
    (default: the name, or the class's name).

    Args:
        name: a registered reward (``shapes``, ``pickscore``, ...); or give class_path instead.
        weight: the term's weight in the sum (or in the gdpo aggregation).
        args: constructor arguments of the registered reward.
        label: the term's name in logs (``train/reward_<label>``).
        reward_class: a reward class's import path (what a ``class_path`` entry becomes).
    """

    name: str | None = None
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)
    label: str | None = None
    # Not the field names class_path / init_args: jsonargparse reserves those keys for its own subclass specs,
    # so the class form reaches us as a plain dict (see from_mapping).
    reward_class: str | None = None

    @classmethod
    def from_mapping(cls, entry: Mapping[str, Any]) -> RewardSpec:
        entry = dict(entry)
        if "class_path" in entry:
            if "args" in entry:
                raise ConfigError(f"reward {entry['class_path']}: constructor arguments of a class_path go in init_args, not args")
            if "name" in entry:
                raise ConfigError(f"reward {entry['class_path']}: give either name (a registered reward) or class_path, not both")
            entry["reward_class"], entry["args"] = entry.pop("class_path"), dict(entry.pop("init_args", None) or {})
        elif "init_args" in entry:
            raise ConfigError(f"reward {entry.get('name')!r}: init_args belongs to a class_path entry; a registered reward takes args")
        unknown = set(entry) - {"name", "weight", "args", "label", "reward_class"}
        if unknown:
            raise ConfigError(f"reward entry {dict(entry)}: unknown keys {sorted(unknown)}; an entry has name + args, or "
                              "class_path + init_args, and optionally weight and label")
        return cls(**entry)

    def check(self) -> None:
        if (self.name is None) == (self.reward_class is None):
            raise ConfigError(
                f"a reward entry needs exactly one of name (a registered reward: {available_rewards()}) "
                f"or class_path (your own, e.g. mypkg.MyReward); got name={self.name!r}, class_path={self.reward_class!r}"
            )

    @property
    def key(self) -> str:
        return self.label or self.name or self.reward_class.rpartition(".")[2]

    def build(self) -> Reward:
        self.check()
        if self.name is not None:
            return build_reward(self.name, **self.args)
        cls = import_class_path(self.reward_class)
        try:
            reward = cls(**self.args)
        except TypeError as err:
            raise ConfigError(f"reward {self.reward_class}(**{self.args}): {err}") from err
        if not callable(reward):
            raise ConfigError(f"reward {self.reward_class} is not callable as reward(images, prompts) -> scores")
        return reward


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

    @classmethod
    def from_specs(cls, specs: Sequence[RewardSpec | Mapping[str, Any] | Callable]) -> WeightedReward:
        """Entries are RewardSpecs, their dict form, or reward callables (weight 1, named by their class)."""
        rewards, weights = {}, {}
        for spec in specs:
            if callable(spec) and not isinstance(spec, Mapping):
                key, reward, weight = getattr(spec, "__name__", type(spec).__name__), spec, 1.0
            else:
                spec = spec if isinstance(spec, RewardSpec) else RewardSpec.from_mapping(spec)
                spec.check()
                key, reward, weight = spec.key, None, spec.weight
            if key in rewards:
                raise ConfigError(f"reward {key!r} is listed twice; merge the entries into one weight or give one a label")
            rewards[key] = reward if reward is not None else spec.build()
            weights[key] = weight
        return cls(rewards, weights)

    def _term(self, name: str, images: torch.Tensor, prompts: Sequence[str], group_ids=None,
              conditions: Sequence | None = None) -> torch.Tensor:
        reward = self.rewards[name]
        uses_conditions = getattr(reward, "uses_condition_images", False)

        def call(index: torch.Tensor | None):
            sel_images = images if index is None else images[index]
            sel_prompts = prompts if index is None else [prompts[i] for i in index.tolist()]
            if not uses_conditions:
                return reward(sel_images, sel_prompts)
            given = [None] * len(prompts) if conditions is None else list(conditions)
            return reward(sel_images, sel_prompts,
                          condition_images=given if index is None else [given[i] for i in index.tolist()])

        try:
            if getattr(reward, "groupwise", False):  # one call per group (a prompt's samples), in batch order
                scores = torch.empty(len(prompts))
                for members in _groups(prompts, group_ids):
                    scores[members] = torch.as_tensor(call(members)).float().cpu()
            else:
                scores = torch.as_tensor(call(None)).detach().to("cpu", torch.float32)
        except Exception as err:
            raise RewardError(f"reward {name!r} raised {type(err).__name__}: {err}") from err
        if scores.shape != (len(prompts),):
            raise RewardError(f"reward {name!r} returned shape {tuple(scores.shape)}, expected ({len(prompts)},)")
        return scores

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], group_ids=None,
                 conditions: Sequence | None = None) -> torch.Tensor:
        """The weighted sum; raises :class:`RewardError` if a term fails or returns non-finite scores."""
        return self.checked_score(images, prompts, group_ids, conditions).total

    def checked_score(self, images: torch.Tensor, prompts: Sequence[str], group_ids=None,
                      conditions: Sequence | None = None) -> RewardScores:
        """:meth:`score`, raising :class:`RewardError` if a term fails or returns non-finite scores."""
        scores = self.score(images, prompts, group_ids, conditions)
        if scores.errors:
            raise RewardError(self.stop_message(scores.errors))
        return scores

    @staticmethod
    def stop_message(errors: Sequence[str]) -> str:
        return "; ".join(errors) + (" (training stops here so that no update is made from a broken reward; fix the "
                                    "reward, or set model.on_reward_error=skip_group to drop the groups)")

    def score(self, images: torch.Tensor, prompts: Sequence[str], group_ids: torch.Tensor | None = None,
              conditions: Sequence | None = None) -> RewardScores:
        """The weighted sum, the per-term scores, which samples every term scored with a finite number, and what
        went wrong (:class:`RewardScores`). A term that raises or returns the wrong shape invalidates the batch.
        A groupwise term (``groupwise = True``) is called once per group: ``group_ids``, or equal prompts.
        ``conditions``: each sample's condition images, for the terms that use them (``uses_condition_images``).
        Keeps no state (safe from a scoring thread)."""
        n = len(prompts)
        total = torch.zeros(n, dtype=torch.float32)
        valid = torch.ones(n, dtype=torch.bool)
        errors: list[str] = []
        terms: dict[str, torch.Tensor] = {}
        for name in self.rewards:
            try:
                scores = self._term(name, images, prompts, group_ids, conditions)
            except RewardError as err:
                errors.append(str(err))
                valid[:] = False
                scores = torch.full((n,), float("nan"))
            else:
                finite = torch.isfinite(scores)
                if not finite.all():
                    errors.append(f"reward {name!r} returned non-finite scores {scores.tolist()} "
                                  f"(samples {(~finite).nonzero().flatten().tolist()})")
                    valid &= finite
            terms[name] = scores
            total += self.weights[name] * scores
        return RewardScores(total, valid, errors, terms, dict(self.weights))


@dataclass
class RewardScores:
    """What scoring a batch gave.

    Attributes:
        total: ``(B,)`` float32 weighted sum of the terms.
        valid: ``(B,)`` bool, the samples every term scored with a finite number.
        errors: what went wrong, one line per failure.
        terms: each term's ``(B,)`` scores by name (NaN where it failed).
        weights: each term's weight by name.
    """

    total: torch.Tensor
    valid: torch.Tensor
    errors: list[str]
    terms: dict[str, torch.Tensor]
    weights: dict[str, float]

    @classmethod
    def cat(cls, parts: Sequence[RewardScores]) -> RewardScores:
        """The scores of consecutive parts of one batch, as one."""
        return cls(torch.cat([p.total for p in parts]), torch.cat([p.valid for p in parts]),
                   [e for p in parts for e in p.errors],
                   {k: torch.cat([p.terms[k] for p in parts]) for k in parts[0].terms}, dict(parts[0].weights))

    def select(self, keep: torch.Tensor) -> RewardScores:
        return RewardScores(self.total[keep], self.valid[keep], list(self.errors),
                            {k: v[keep] for k, v in self.terms.items()}, dict(self.weights))


def _groups(prompts: Sequence[str], group_ids: torch.Tensor | None) -> list[torch.Tensor]:
    keys = group_ids.tolist() if group_ids is not None else list(prompts)
    members: dict = {}
    for i, k in enumerate(keys):
        members.setdefault(k, []).append(i)
    return [torch.tensor(m) for m in members.values()]


class RewardError(FloatingPointError, ValueError):
    """A reward term raised, returned the wrong number of scores, or returned NaN/inf."""
