"""Preference pairs for offline Diffusion-DPO: a JSONL file of (prompt, chosen image, rejected image).

One JSON object per line::

    {"prompt": "a red circle", "chosen": "images/0001_chosen.png", "rejected": "images/0001_rejected.png"}

Image paths are relative to the JSONL file's folder (absolute paths are kept). Every image is checked when the
DataModule is built, before any training: it must exist, decode, and have the configured ``resolution``; all the
problems are reported in one error naming the JSONL file, the line and the image. Training batches hold
``prompt`` (a list of strings), ``chosen`` and ``rejected`` (float32 ``(B, 3, H, W)`` in [0, 1]).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from flowrl.data import PromptSource, ValidationPrompts, numbered_lines
from flowrl.errors import ConfigError
from flowrl.plugins import preference_set
from flowrl.validation import check_number

__all__ = ["PreferenceDataModule", "PreferenceDataset", "PreferencePair", "load_preference_pairs", "read_image"]



@dataclass(frozen=True)
class PreferencePair:
    """One line of a preference file: the prompt and the absolute paths of its two images."""

    prompt: str
    chosen: str
    rejected: str
    line: int


def resolve_preference_path(source: str) -> str:
    """A registered preference set (``toy:<name>``, shipped with the toy world: :mod:`flowrl.plugins`) or a path."""
    return preference_set(source) or os.path.expanduser(source)


def read_image(path: str) -> torch.Tensor:
    """An image file as float32 ``(3, H, W)`` in [0, 1] (any mode PIL reads, converted to RGB)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0


def _image_problem(path: str, height: int, width: int) -> str | None:
    """Why ``path`` cannot be used (missing, undecodable, wrong size), or None."""
    from PIL import Image

    if not os.path.isfile(path):
        return "does not exist"
    try:
        with Image.open(path) as image:
            image.load()
            w, h = image.size
    except Exception as e:  # noqa: BLE001 (PIL raises many kinds for a broken file)
        return f"cannot be decoded as an image ({type(e).__name__}: {e})"
    if (h, w) != (height, width):
        return f"is {h}x{w} (height x width), not the configured resolution {height}x{width}"
    return None


def load_preference_pairs(source: str, height: int, width: int, name: str = "data.train_pairs") -> list[PreferencePair]:
    """The pairs of a JSONL preference file, every image checked; one :class:`ConfigError` lists every problem
    (file, line, field, image path and what is wrong)."""
    path = resolve_preference_path(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: preference file {path!r} does not exist; give a .jsonl file with one "
                                "{\"prompt\", \"chosen\", \"rejected\"} object per line")
    folder = os.path.dirname(os.path.abspath(path))
    pairs: list[PreferencePair] = []
    problems: list[str] = []
    for number, text in numbered_lines(path, name):  # (a line that is not UTF-8 is refused naming it)
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            problems.append(f"{path}, line {number}: not valid JSON ({e.msg})")
            continue
        missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(record, dict) or k not in record]
        if missing:
            problems.append(f"{path}, line {number}: no {', '.join(repr(k) for k in missing)} field")
            continue
        images = {}
        for field in ("chosen", "rejected"):
            image = os.path.join(folder, os.path.expanduser(str(record[field])))
            problem = _image_problem(image, height, width)
            if problem is not None:
                problems.append(f"{path}, line {number}: {field} image {image} {problem}")
            images[field] = image
        if not str(record["prompt"]).strip():
            problems.append(f"{path}, line {number}: the prompt is empty")
        pairs.append(PreferencePair(str(record["prompt"]).strip(), images["chosen"], images["rejected"], number))
    if problems:
        shown = problems[:10]
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise ConfigError(f"{name}: {len(problems)} problem(s) in the preference file{more}: " + "; ".join(shown))
    if not pairs:
        raise ConfigError(f"{name}: {path} holds no preference pairs; add at least one line")
    return pairs


class PreferenceDataset(Dataset):
    """The pairs, each item ``{"prompt", "chosen", "rejected"}`` with the images as ``(3, H, W)`` tensors."""

    def __init__(self, pairs: Sequence[PreferencePair]):
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        pair = self.pairs[index]
        return {"prompt": pair.prompt, "chosen": read_image(pair.chosen), "rejected": read_image(pair.rejected)}


def collate_pairs(items: list[dict]) -> dict:
    return {"prompt": [it["prompt"] for it in items],
            "chosen": torch.stack([it["chosen"] for it in items]),
            "rejected": torch.stack([it["rejected"] for it in items])}


class PreferenceDataModule(ValidationPrompts):
    """Offline preference pairs for :class:`flowrl.algorithms.dpo.OfflineDPO`; validation prompts as
    :class:`flowrl.data.PromptDataModule` serves them.

    Args:
        train_pairs: a JSONL file, one ``{"prompt", "chosen", "rejected"}`` object per line, image paths relative to
            the file; ``toy:<name>`` is a set shipped with the toy world (``toy:pairs``).
        resolution: the size every image must have, an int or [height, width] (the model's ``resolution``).
        batch_size: pairs per process and training batch.
        val_prompts: validation prompts (a .txt / .jsonl file, an inline list or a toy prompt set); null = none.
        val_batch_size: samples per validation batch.
        val_samples_per_prompt: samples of each validation prompt.
        max_val_prompts: use only the first this many validation prompts; null = all.
        shuffle: reshuffle the pairs every epoch (seeded by ``seed`` and the epoch).
        seed: seed of the pair order.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        train_pairs: str,
        resolution: int | list[int] = 512,
        batch_size: int = 8,
        val_prompts: PromptSource | None = None,
        val_batch_size: int = 16,
        val_samples_per_prompt: int = 1,
        max_val_prompts: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        height, width = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        for value in (height, width):
            check_number("data.resolution", value, 1)
        check_number("data.batch_size", batch_size, 1, hint=" (pairs per process and batch)")
        check_number("data.val_batch_size", val_batch_size, 1)
        check_number("data.val_samples_per_prompt", val_samples_per_prompt, 1)
        check_number("data.max_val_prompts", max_val_prompts, 1, allow_none=True, hint="; null = all")
        check_number("data.num_workers", num_workers, 0)
        self.resolution = (int(height), int(width))
        self.pairs = load_preference_pairs(train_pairs, *self.resolution)
        self._set_validation(val_prompts, max_val_prompts, val_batch_size, val_samples_per_prompt, num_workers)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        dataset = PreferenceDataset(self.pairs)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=self.shuffle, seed=self.seed,
                                     drop_last=False)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=collate_pairs,
                          num_workers=self.num_workers)
