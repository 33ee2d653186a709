"""Range checks of numeric options: every refusal names the option, the allowed range and the value."""

from __future__ import annotations

import math
from collections.abc import Sequence

from flowrl.errors import ConfigError

__all__ = ["check_number", "check_range_option"]


def _interval(low, high, low_open, high_open) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    if low is None:
        return f"{'<' if high_open else '<='} {high}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def check_number(name: str, value, low=None, high=None, *, low_open: bool = False, high_open: bool = False,
                 allow_none: bool = False, hint: str = "") -> None:
    """Refuse ``value`` unless it is a finite number in the interval (None only with ``allow_none``)."""
    if value is None:
        if allow_none:
            return
        raise ConfigError(f"{name} must be a number {_interval(low, high, low_open, high_open)}, got null{hint}")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        none = " (or null)" if allow_none else ""
        raise ConfigError(f"{name}={value!r} is out of range: it must be {_interval(low, high, low_open, high_open)}"
                          f"{none}{hint}")


def check_range_option(name: str, value, *, allow_none: bool = True, what: str = "") -> None:
    """A clip range: a number ``c > 0`` (the range ``[-c, c]``) or a ``[low, high]`` pair with ``low < 0 < high``."""
    if value is None and allow_none:
        return
    if isinstance(value, Sequence) and not isinstance(value, str):
        pair = list(value)
        if len(pair) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in pair) or not (
            pair[0] < 0 < pair[1]
        ):
            raise ConfigError(f"{name}={pair!r}: a [low, high] pair needs finite low < 0 < high{what}")
        return
    check_number(name, value, 0, low_open=True, allow_none=allow_none,
                 hint=f", or a [low, high] pair with low < 0 < high{what}")
