"""Rewards by name: ``@register_reward("name")`` and ``build_reward(name, **args)``.

The built-in rewards register themselves when their module is imported; the table below names those modules as
strings, imported on the first look-up, so the registry imports none of them (no import cycle, and heavy reward
models load only when used).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from flowrl.errors import ConfigError
from flowrl.plugins import load_plugins

__all__ = ["available_rewards", "build_reward", "register_reward"]

#: the modules whose import registers the built-in rewards
BUILTIN_MODULES = ("flowrl.rewards.clip", "flowrl.rewards.hps", "flowrl.rewards.image_reward", "flowrl.rewards.jpeg",
                   "flowrl.rewards.ocr", "flowrl.rewards.remote", "flowrl.rewards.video",
                   "flowrl.rewards.vlm_judge", "flowrl.rewards.clip_edit")

_REGISTRY: dict[str, Callable[..., Any]] = {}


def register_reward(name: str) -> Callable:
    """Class/function decorator: makes a reward buildable by ``name`` from configs."""

    def wrap(factory):
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ConfigError(f"reward name {name!r} is already registered by {_REGISTRY[name]!r}")
        _REGISTRY[name] = factory
        return factory

    return wrap


def _import_builtins() -> None:
    """The built-in rewards, and those of the plugins (:mod:`flowrl.plugins`, e.g. the toy world's verifier)."""
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    load_plugins()


def available_rewards() -> list[str]:
    _import_builtins()
    return sorted(_REGISTRY)


def build_reward(name: str, **kwargs: Any):
    _import_builtins()
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown reward {name!r}; registered rewards are {sorted(_REGISTRY)}. "
            "Register your own with @flowrl.rewards.register_reward('name')."
        )
    return _REGISTRY[name](**kwargs)
