"""Seeded generators keyed by what they draw for, so that a draw depends on neither the process count nor the
micro-batching (world-size invariance and exact resume rest on this)."""

from __future__ import annotations

import zlib

import torch

__all__ = ["keyed_generator", "per_sample_generators"]


def keyed_generator(*key) -> torch.Generator:
    """A CPU generator seeded by the CRC-32 of ``repr(key)`` (stable across processes and runs)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(tuple(key)).encode()))


def per_sample_generators(seed: int, n: int, *salt, first: int = 0) -> list[torch.Generator]:
    """One generator per sample ``first .. first + n - 1`` of the global batch: ``keyed_generator(seed, *salt, i)``.

    A process holding samples ``first ..`` of a batch spread over several processes draws what one process
    holding the whole batch would draw for them."""
    return [keyed_generator(seed, *salt, first + j) for j in range(n)]
