"""Tiny FLUX.1-Kontext: a stock ``FluxKontextPipeline`` on the tiny FLUX.1-dev's components (the two share every
module; Kontext differs in how ``__call__`` feeds the condition image)."""

from __future__ import annotations

from diffusers import FluxKontextPipeline

from flowrl.policy.tiny.flux import build as build_flux


def build(seed: int = 0, **kwargs) -> FluxKontextPipeline:
    """A randomly initialised ``FluxKontextPipeline`` (the tiny FLUX.1-dev's modules; ``kwargs`` go to it)."""
    return FluxKontextPipeline(**build_flux(seed=seed, **kwargs).components)
