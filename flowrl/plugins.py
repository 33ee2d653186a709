"""Names that packages add to flowrl: model aliases (``flowrl:toy``), prompt sets (``toy:eval``) and rewards.

A package registers them when it is imported, and declares itself under the ``flowrl.plugins`` entry point group
(``setup.cfg``: ``flowrl.plugins = toy = flowrl.toy``), so flowrl finds it without naming it: the first look-up of a
name flowrl does not know imports every plugin once. The toy world is such a plugin; so can a user's package be.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable

__all__ = ["load_plugins", "model_alias", "model_aliases", "preference_set", "prompt_set", "register_model_alias",
           "register_preference_sets", "register_prompt_sets"]

_MODEL_ALIASES: dict[str, Callable[[], str]] = {}
_PROMPT_SETS: dict[str, Callable[[str], str]] = {}
_PREFERENCE_SETS: dict[str, Callable[[str], str]] = {}
_loaded = False


def register_model_alias(alias: str, resolve: Callable[[], str]) -> None:
    """``pretrained_model_name_or_path: <alias>`` loads the folder ``resolve()`` returns."""
    _MODEL_ALIASES[alias] = resolve


def register_prompt_sets(prefix: str, resolve: Callable[[str], str]) -> None:
    """A prompt source ``<prefix>:<name>`` is the prompt file ``resolve(name)``."""
    _PROMPT_SETS[prefix] = resolve


def register_preference_sets(prefix: str, resolve: Callable[[str], str]) -> None:
    """A preference set ``<prefix>:<name>`` is the JSONL file ``resolve(name)`` (prompt, chosen, rejected)."""
    _PREFERENCE_SETS[prefix] = resolve


def load_plugins() -> None:
    """Import every package of the ``flowrl.plugins`` entry point group, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for entry in importlib.metadata.entry_points(group="flowrl.plugins"):
        entry.load()


def model_alias(name: str) -> str | None:
    """The folder a model alias stands for, or None when ``name`` is no alias (a hub id or a path)."""
    if name not in _MODEL_ALIASES:
        load_plugins()
    return _MODEL_ALIASES[name]() if name in _MODEL_ALIASES else None


def model_aliases() -> list[str]:
    """Every registered model alias (``flowrl:toy`` ...)."""
    load_plugins()
    return sorted(_MODEL_ALIASES)


def _named_file(table: dict[str, Callable[[str], str]], source: str) -> str | None:
    prefix, sep, name = source.partition(":")
    if not sep:
        return None
    if prefix not in table:
        load_plugins()
    return table[prefix](name) if prefix in table else None


def prompt_set(source: str) -> str | None:
    """The file of a prompt set ``<prefix>:<name>``, or None when ``source`` names none."""
    return _named_file(_PROMPT_SETS, source)


def preference_set(source: str) -> str | None:
    """The JSONL file of a preference set ``<prefix>:<name>``, or None when ``source`` names none."""
    return _named_file(_PREFERENCE_SETS, source)
