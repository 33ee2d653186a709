"""The error flowrl raises for a configuration it refuses.

``ConfigError`` is a ``ValueError`` (Python users catch either); ``flowrl fit`` prints it as one
``error: ...`` line and exits with status 2, without a traceback (``--debug`` or ``FLOWRL_DEBUG=1``
brings the traceback back)."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration flowrl refuses; the message names the option and the fix."""
