"""Which options each trainer uses, so that an option that would do nothing is refused, not ignored.

A trainer's options are the parameters of its ``__init__`` and of every ``__init__`` it forwards
``**kwargs`` to, minus its ``unused_options`` (options it inherits but has no use for, such as
``clip_range`` for NFT: they stay in the signature with a None default, which means "not set").
Both the Python constructors (``GRPO`` and ``DecoupledModule`` check the ``**kwargs`` they receive) and
``flowrl fit`` (before parsing) call :func:`refuse_options_of_other_trainers`, so the message names the trainer that would use the option.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping

from flowrl.errors import ConfigError

__all__ = ["trainer_options", "refuse_options_of_other_trainers"]


def _signature_options(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def trainer_options(cls: type) -> set[str]:
    """The options trainer class ``cls`` uses."""
    return _signature_options(cls) - set(getattr(cls, "unused_options", ()))


def refuse_options_of_other_trainers(cls: type, given: Mapping[str, object] | Iterable[str]) -> None:
    """Raise :class:`ConfigError` for a given option ``cls`` does not use but another trainer does.

    ``given`` is a mapping of option to value (the Python constructor: an unused option set to None is
    "not set") or the option names a config sets. Names no trainer knows are left to the caller
    (Python's TypeError, jsonargparse's unknown-key error)."""
    from flowrl.algorithms import ALGORITHMS

    values = dict(given) if isinstance(given, Mapping) else {name: ... for name in given}
    own = trainer_options(cls)
    foreign = [n for n, v in values.items() if n not in own and not (v is None and n in getattr(cls, "unused_options", ()))]
    options = {t: trainer_options(other) for t, other in ALGORITHMS.items()} if foreign else {}
    for name in foreign:
        users = [t for t, names in options.items() if name in names]
        if users:
            raise ConfigError(
                f"model.{name} does nothing for trainer_type {cls.trainer_type!r}; it is an option of trainer_type "
                f"{', '.join(users)}. Remove it, or choose one of those trainers"
            )
