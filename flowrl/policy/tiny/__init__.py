"""Tiny offline pipelines of every supported family, for tests (yours too): random weights built from config
objects, tokenizers built in memory, nothing downloaded. ``build_tiny_pipeline("flux")`` returns a stock
diffusers pipeline to ``save_pretrained`` and load back through the same ``from_pretrained`` path as a hub
model. Each family's builder is the module ``flowrl.policy.tiny.<family>`` with a ``build(seed=0, **kw)``."""

from __future__ import annotations

import importlib

__all__ = ["FAMILIES", "build_tiny_pipeline"]

#: config directory names under lightning_configs/ -> family module
FAMILIES = {"sd35": "sd3", "flux": "flux", "qwen_image": "qwen_image", "wan": "wan", "flux_kontext": "flux_kontext",
            "qwen_image_edit": "qwen_image_edit", "wan_i2v": "wan_i2v", "wan22": "wan22", "flux2": "flux2",
            "z_image": "z_image"}


def build_tiny_pipeline(family: str, seed: int = 0, **kwargs):
    """A tiny random pipeline of ``family`` (a module of this package: ``sd3``, ``flux``, ``wan_i2v`` ...)."""
    try:
        module = importlib.import_module(f"{__name__}.{FAMILIES.get(family, family)}")
    except ModuleNotFoundError as e:
        raise ValueError(f"no tiny pipeline for family {family!r}; known: {sorted(set(FAMILIES.values()))}") from e
    return module.build(seed=seed, **kwargs)
