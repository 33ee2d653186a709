"""Prompt embeddings kept across iterations: a prompt seen before is not encoded again.

The text encoders are frozen, so a prompt's conditioning never changes during a run; a prompt set smaller than
the run's samples (every RL dataset of this field, and every validation set) repeats each prompt many times.
Entries are one-sample :class:`~flowrl.policy.adapter.Conditioning` rows kept in host memory (plentiful next to
an accelerator's, and a row moves to the device in a fraction of a millisecond, where T5-XXL takes milliseconds
to encode it), evicted least recently used first under a byte budget.

Hand-written because ``functools.lru_cache`` bounds entries by count and keys whole calls: here one batch's
distinct prompts are looked up row by row and the bound is in bytes (an SD3.5 row is 2.7-5.5 MB).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from flowrl.policy.adapter import Conditioning


def _nbytes(cond: Conditioning) -> int:
    tensors = list(cond.tensors.values()) + [v for v in cond.shared.values() if isinstance(v, torch.Tensor)]
    tensors += [x for v in cond.per_sample.values() for x in v if isinstance(x, torch.Tensor)]
    tensors += [im for v in cond.per_sample.values() for x in v if hasattr(x, "images") for im in x.images]
    return sum(t.numel() * t.element_size() for t in tensors)


class PromptCache:
    """Conditioning rows by prompt, at most ``max_mb`` megabytes of them (0: nothing kept)."""

    def __init__(self, max_mb: float):
        self.max_bytes = int(max_mb * 2**20)
        self._rows: OrderedDict[str, Conditioning] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._rows

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, prompt: str) -> Conditioning | None:
        row = self._rows.get(prompt)
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        self._rows.move_to_end(prompt)
        return row

    def put(self, prompt: str, row: Conditioning) -> None:
        """Keeps the one-sample ``row`` (a copy on the host) as ``prompt``'s, evicting the least recently used."""
        if self.max_bytes <= 0:
            return
        host = row.to("cpu")
        # own storage: the caller's tensors stay the caller's to change
        row = Conditioning({k: v.clone() for k, v in host.tensors.items()},
                           {k: [x.clone() if isinstance(x, torch.Tensor) else x for x in v]
                            for k, v in host.per_sample.items()}, host.shared)
        size = _nbytes(row)
        if size > self.max_bytes:
            return
        old = self._rows.pop(prompt, None)
        if old is not None:
            self._bytes -= _nbytes(old)
        self._rows[prompt] = row
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, evicted = self._rows.popitem(last=False)
            self._bytes -= _nbytes(evicted)
