"""Objects named by an import path in a config (``package.module.Name``)."""

from __future__ import annotations

import importlib

from flowrl.errors import ConfigError

__all__ = ["import_class_path"]


def import_class_path(path: str):
    """``pkg.module.Name`` -> the object; a clear error naming what is missing (jsonargparse's own importer
    is private API, hence this one)."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ConfigError(f"class_path {path!r} needs a module: write it as package.module.ClassName")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"class_path {path!r}: cannot import {module_name!r} ({err}); is it installed or on PYTHONPATH?") from err
    if not hasattr(module, attr):
        raise ConfigError(f"class_path {path!r}: module {module_name!r} has no {attr!r}")
    return getattr(module, attr)
