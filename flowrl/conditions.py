"""Condition images: what an editing or image-to-video sample is generated from, besides its prompt.

A row of a prompt file may name one or more images (``{"prompt": "make it red", "images": ["cat.png"]}``); they are
checked before training (the file exists, decodes, and has a size a model can use), and every sample of the row's
group is generated from the same images. :class:`ConditionImages` carries them through the rollout, the training
step, validation, ``flowrl sample`` and the rewards: float32 ``(C, H, W)`` tensors in [0, 1], RGB, each at its own
size (a family's adapter resizes them as its stock pipeline does), and a content key that the prompt cache and the
unconditional CFG branch use to recognise the same images again.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from functools import cached_property, lru_cache

import numpy as np
import torch

from flowrl.errors import ConfigError

__all__ = ["ConditionImages", "check_condition_image", "load_condition_image", "to_pil_image", "MIN_SIDE",
           "MAX_PIXELS"]

#: the smallest side a condition image may have (every family's VAE downsamples 8x, and packs 2x2)
MIN_SIDE = 16
#: the most pixels a condition image may have (PIL's decompression-bomb limit is 89.5 M; 64 M is 8192 x 8192)
MAX_PIXELS = 8192 * 8192


class ConditionImages:
    """The condition images of one sample: a read-only sequence of float32 ``(3, H, W)`` tensors in [0, 1].

    Attributes:
        images: the images, each at its own size.
        sources: where each came from (file paths), for messages.
        caption: a caption of the condition image (a row's ``source_prompt``), for rewards that compare the edit
            with the original's text (CLIP directional similarity); None if the row has none.

    A plain class, not a dataclass: Lightning moves a batch's tensors to the device through dataclasses and
    sequences, and these stay on the host until the family's adapter encodes them.
    """

    def __init__(self, images: Sequence[torch.Tensor], sources: Sequence[str] = (), caption: str | None = None):
        self.images, self.sources, self.caption = tuple(images), tuple(sources), caption
        for i, image in enumerate(self.images):
            if not (isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3):
                shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
                raise ValueError(f"condition image {i} must be a (3, H, W) tensor in [0, 1], got {shape}")

    def __repr__(self) -> str:
        sizes = ", ".join(f"{im.shape[2]}x{im.shape[1]}" for im in self.images)
        return f"ConditionImages([{sizes}], sources={list(self.sources)}, caption={self.caption!r})"

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self):
        return iter(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]

    @cached_property
    def key(self) -> str:
        """A digest of the images' sizes and pixels: equal keys, equal images (whatever file they came from)."""
        digest = hashlib.sha1()
        for image in self.images:
            digest.update(repr(tuple(image.shape)).encode())
            digest.update(image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()

    @classmethod
    def from_files(cls, paths: Sequence[str], caption: str | None = None) -> ConditionImages:
        return cls(tuple(load_condition_image(p) for p in paths), tuple(str(p) for p in paths), caption)

    @classmethod
    def from_tensors(cls, images: torch.Tensor | Sequence[torch.Tensor], caption: str | None = None) -> ConditionImages:
        """From a ``(3, H, W)`` tensor, a ``(K, 3, H, W)`` batch of K images, or a list of ``(3, H, W)`` tensors."""
        if isinstance(images, torch.Tensor):
            images = [images] if images.ndim == 3 else list(images.unbind(0))
        return cls(tuple(im.detach().float().clamp(0, 1) for im in images), caption=caption)


def check_condition_image(path: str) -> tuple[int, int]:
    """``(width, height)`` of the image file ``path``, after checking that it exists, decodes and has a usable size;
    a ``ValueError`` naming the problem otherwise (the caller adds the file and line it was named on)."""
    from PIL import Image

    if not os.path.isfile(path):
        raise ValueError(f"condition image {path!r} does not exist")
    try:
        with Image.open(path) as image:
            size = image.size
            if size[0] * size[1] > MAX_PIXELS:
                raise ValueError(f"condition image {path!r} is {size[0]}x{size[1]}, more than {MAX_PIXELS} pixels; "
                                 "resize it")
            image.load()  # decodes the pixels: a truncated or corrupt file fails here, not in the middle of a run
    except ValueError:
        raise
    except Exception as err:  # PIL raises many kinds (UnidentifiedImageError, OSError, DecompressionBombError)
        raise ValueError(f"condition image {path!r} cannot be decoded ({type(err).__name__}: {err})") from None
    if min(size) < MIN_SIDE:
        raise ValueError(f"condition image {path!r} is {size[0]}x{size[1]}; each side needs at least {MIN_SIDE} px")
    return size


@lru_cache(maxsize=256)
def load_condition_image(path: str) -> torch.Tensor:
    """The image file ``path`` as a float32 ``(3, H, W)`` RGB tensor in [0, 1] (kept for the next sample of the group:
    a group repeats its row ``group_size`` times)."""
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)


def resolve_image_paths(entry, base_dir: str, where: str) -> list[str]:
    """A row's ``image`` (one path) or ``images`` (a list of paths) as absolute paths (relative ones against the
    file's folder); a malformed field is a :class:`ConfigError` naming ``where``."""
    paths = [entry] if isinstance(entry, str) else entry
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        raise ConfigError(f"{where}: 'images' must be a non-empty list of image paths (or 'image' one path), "
                          f"got {entry!r}")
    return [p if os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, os.path.expanduser(p)))
            for p in paths]


def to_pil_image(image: torch.Tensor):
    """A float ``(3, H, W)`` tensor in [0, 1] as the 8-bit PIL image it was read from (exact for k / 255 values: what a
    stock pipeline is given): the rewards' own 8-bit conversion of a batch of one."""
    from flowrl.rewards.base import to_pil

    return to_pil(image[None])[0]
