"""How a rollout keeps its tensors between sampling and training: their dtype and where they live.

A training rollout stores, for each trained step, its input latents, its sample, its log-prob (and, for some
algorithms, the step mean and the unconditional CFG branch): ``(B, K, ...)`` float32 tensors on the device, K
times the size of the batch's latents. Two options shrink that footprint (``FlowRLModule``'s
``latent_storage_dtype`` and ``offload_rollout``), and each keeps the first update's on-policy ratio exactly 1:

* ``latent_storage_dtype`` (bfloat16, float16): the trained steps' input latents and samples are stored in that
  dtype. Rounding them after the fact would make training recompute the log-prob of a different sample at a
  different point (the first ratio then moves off 1). Instead the rollout itself rounds them where they are
  made: a trained step's input is rounded before the denoiser sees it, and its sample is rounded before it is
  scored and before the next step starts from it. The stored values are then exactly the ones the rollout
  computed with, and training, reading them back as float32 (an exact widening), repeats the rollout's arithmetic
  bit for bit. What changes is the sampled trajectory: each trained step's state carries a rounding of relative
  size at most 2**-8 (bfloat16) or 2**-11 (float16), far below the step's injected noise (measured in
  ``docs/performance.md``). The step means and the CFG branch are the network's outputs, which no rounding of
  the inputs reproduces, so they stay float32, as do the log-probs.
* ``offload_rollout``: each stored tensor moves to host memory as the rollout records it (the device never holds
  the stacked trajectory) and comes back, as float32 rows, when training reads a micro-batch of it. Bytes move;
  no value changes. The decoded images stay where the rewards read them, and the decoupled algorithms'
  per-iteration training data (their noise and frozen velocities, made after sampling) on the device.

With neither option set the rollout holds plain tensors, as before. With either, the stored fields are
:class:`StoredTensor` objects, which training indexes exactly as it indexes tensors (``rollout.latents[idx, k]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowrl.errors import ConfigError

__all__ = ["STORAGE_DTYPES", "RolloutStorage", "StoredTensor"]

#: the dtypes a rollout's latents may be stored in
STORAGE_DTYPES = ("float32", "bfloat16", "float16")


class StoredTensor:
    """A rollout tensor as it is stored (``data``: its storage dtype, host memory when offloaded), read back by
    indexing: ``stored[idx, k]`` is those rows as float32 on the compute ``device``, as a plain tensor would give
    them. ``shape``, ``ndim``, ``device`` and ``dtype`` describe what reading gives; ``data.dtype`` and
    ``data.device`` what is held."""

    def __init__(self, data: torch.Tensor, device: torch.device | str, dtype: torch.dtype = torch.float32):
        self.data = data
        self.device = torch.device(device)
        self.dtype = dtype

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    def __len__(self) -> int:
        return len(self.data)

    def size(self, dim: int | None = None):
        return self.data.size() if dim is None else self.data.size(dim)

    @property
    def nbytes(self) -> int:
        """Bytes held (in the storage dtype)."""
        return self.data.numel() * self.data.element_size()

    def __getitem__(self, index) -> torch.Tensor:
        index = _index_on(index, self.data.device)
        return self.data[index].to(device=self.device, dtype=self.dtype)

    def materialize(self) -> torch.Tensor:
        """The whole tensor as float32 on the compute device."""
        return self.data.to(device=self.device, dtype=self.dtype)

    def __repr__(self) -> str:
        return (f"StoredTensor(shape={tuple(self.shape)}, stored={self.data.dtype} on {self.data.device}, "
                f"read as {self.dtype} on {self.device})")


def _index_on(index, device: torch.device):
    """``index`` with its tensors on ``device`` (a host-held tensor is indexed with host indices)."""
    if isinstance(index, torch.Tensor):
        return index.to(device)
    if isinstance(index, tuple):
        return tuple(_index_on(i, device) for i in index)
    return index


@dataclass(frozen=True)
class RolloutStorage:
    """The storage rule of a sampler's rollouts (see the module docstring).

    Args:
        latent_dtype: dtype the trained steps' input latents and samples are stored in (``float32``, ``bfloat16``,
            ``float16``); the rollout rounds them to it where they are made.
        offload: move every stored tensor to host memory as it is recorded; training reads micro-batches back.
    """

    latent_dtype: str = "float32"
    offload: bool = False

    def __post_init__(self):
        if self.latent_dtype not in STORAGE_DTYPES:
            raise ConfigError(f"latent_storage_dtype={self.latent_dtype!r}; choose one of {', '.join(STORAGE_DTYPES)}")
        if not isinstance(self.offload, bool):
            raise ConfigError(f"offload_rollout={self.offload!r}; set true or false")

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.latent_dtype)

    @property
    def is_plain(self) -> bool:
        """float32 on the device: the rollout holds plain tensors."""
        return self.latent_dtype == "float32" and not self.offload

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (float32) rounded to the storage dtype and widened back: the value the stored copy will hold."""
        if self.latent_dtype == "float32":
            return x
        return x.to(self.dtype).to(x.dtype)

    def keep(self, t: torch.Tensor | None, latent: bool) -> torch.Tensor | None:
        """A chunk's tensor as it is held until the rollout is stacked: a ``latent`` (an input or a sample, already
        :meth:`round`-ed) in the storage dtype, and on the host when offloading."""
        if t is None:
            return None
        if latent and self.latent_dtype != "float32":
            t = t.to(self.dtype)
        return t.to("cpu") if self.offload else t

    def wrap(self, t: torch.Tensor | None, device: torch.device) -> torch.Tensor | StoredTensor | None:
        """A stacked field as the :class:`Rollout` holds it: the plain tensor when neither option is set, else a
        :class:`StoredTensor` read back as float32 on ``device`` (every stored field alike, whatever it holds)."""
        return t if t is None or self.is_plain else StoredTensor(t, device)
