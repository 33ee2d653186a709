"""Prompt data: datasets from a txt/jsonl file or an inline list, and group sampling.

A training batch holds ``batch_size`` samples = ``batch_size / group_size`` prompts, each repeated
``group_size`` times in a row; a group never straddles two batches or two processes, so group
statistics (advantages) can be computed on each process without communication.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from flowrl.conditions import ConditionImages, check_condition_image, resolve_image_paths
from flowrl.errors import ConfigError
from flowrl.plugins import prompt_set
from flowrl.validation import check_number

PromptSource = str | list[str]


def load_prompts(source: PromptSource, name: str = "prompts") -> list[str]:
    """A list of prompts from an inline list, a ``.txt`` file (one per line) or a ``.jsonl`` file
    (one object per line with a ``"prompt"`` field). ``toy:<name>`` is a prompt file of the toy world
    (``toy:train``, ``toy:train_balanced``: the training prompts with every category equally likely,
    ``toy:heldout``, ``toy:eval``: the held-out prompts balanced over categories). A file whose rows name
    condition images is refused here: read it with :func:`load_prompt_rows`."""
    rows = load_prompt_rows(source, name)
    if rows.images is not None:
        raise ConfigError(f"{name}: {rows.origin} names condition images, which this reader does not use; give a "
                          "prompt file without images")
    return rows.prompts


@dataclass
class PromptRows:
    """A prompt file's rows: the prompts, and, where its rows name them, each row's condition image paths and
    caption of the condition image (``source_prompt``)."""

    prompts: list[str]
    images: list[tuple[str, ...]] | None = None
    captions: list[str | None] | None = None
    origin: str = "the inline list"

    def __len__(self) -> int:
        return len(self.prompts)

    def head(self, n: int | None) -> PromptRows:
        cut = slice(None, n)
        return PromptRows(self.prompts[cut], None if self.images is None else self.images[cut],
                          None if self.captions is None else self.captions[cut], self.origin)

    def condition(self, index: int) -> ConditionImages | None:
        """Row ``index``'s condition images, decoded (None for a file without images)."""
        if self.images is None:
            return None
        return ConditionImages.from_files(self.images[index], self.captions[index])


def load_prompt_rows(source: PromptSource, name: str = "prompts", image_dir: str | None = None) -> PromptRows:
    """:func:`load_prompts`' sources, where a ``.jsonl`` row may also name condition images: ``"images": [paths]``
    (or ``"image": path``; relative paths are read from ``image_dir``, by default the file's folder) and
    ``"source_prompt"``, a caption of the condition image. Every image is checked before anything trains (it exists, decodes, has a usable size);
    a failure names the file and the line. Either every row names images or none does."""
    if isinstance(source, (list, tuple)):
        rows = PromptRows([str(p) for p in source])
    else:
        path = _resolve_prompt_path(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name}: prompt file {path!r} does not exist; give a .txt or .jsonl path or an inline list")
        lines = numbered_lines(path, name)
        rows = (_jsonl_rows(path, lines, name, image_dir) if path.endswith(".jsonl")
                else PromptRows([t for _, t in lines]))
        rows.origin = path
    keep = [i for i, p in enumerate(rows.prompts) if p.strip()]
    rows = PromptRows([rows.prompts[i].strip() for i in keep],
                      None if rows.images is None else [rows.images[i] for i in keep],
                      None if rows.captions is None else [rows.captions[i] for i in keep], rows.origin)
    if not rows.prompts:
        raise ConfigError(f"{name}: {rows.origin} holds no prompts; add at least one non-empty line")
    return rows


def _jsonl_rows(path: str, lines: list[tuple[int, str]], name: str, image_dir: str | None = None) -> PromptRows:
    prompts, images, captions, with_images = [], [], [], set()
    base_dir = os.path.abspath(os.path.expanduser(image_dir)) if image_dir else os.path.dirname(os.path.abspath(path))
    for number, line in lines:
        where = f"{name}: line {number} of {path}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where} is not JSON ({e.msg} at column {e.colno}); "
                              'each line is one object such as {"prompt": "a red circle"}') from None
        if not isinstance(record, dict) or "prompt" not in record:
            raise ConfigError(f"{where} has no 'prompt' field")
        prompts.append(str(record["prompt"]))
        if "image" in record and "images" in record:
            raise ConfigError(f"{where} has both 'image' and 'images'; give one")
        entry = record.get("images", record.get("image"))
        with_images.add(entry is not None)
        if entry is None:
            images.append(())
            captions.append(None)
            continue
        paths = resolve_image_paths(entry, base_dir, where)
        for p in paths:
            try:
                check_condition_image(p)
            except ValueError as err:
                raise ConfigError(f"{where}: {err}") from None
        images.append(tuple(paths))
        caption = record.get("source_prompt")
        captions.append(None if caption is None else str(caption))
    if with_images == {True, False}:
        raise ConfigError(f"{name}: some rows of {path} name condition images and some do not; every row of a "
                          "prompt file needs its images, or none has any (split the file)")
    if True in with_images:
        return PromptRows(prompts, images, captions)
    return PromptRows(prompts)


def numbered_lines(path: str, name: str) -> list[tuple[int, str]]:
    """The non-empty lines of a prompt file with their line numbers (from 1); a line that is not UTF-8 is refused
    naming the file, the line and the byte."""
    with open(path, "rb") as f:
        raw = f.read()
    out = []
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8").strip()  # (a BOM is not part of line 1)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{name}: line {number} of {path} is not UTF-8 (byte 0x{line[e.start]:02x} at column "
                              f"{e.start + 1}); save the file as UTF-8") from None
        if text:
            out.append((number, text))
    return out


def _resolve_prompt_path(source: str) -> str:
    """A prompt set a plugin registered (``toy:eval``, :mod:`flowrl.plugins`), else a path."""
    return prompt_set(source) or os.path.expanduser(source)


class PromptDataset(Dataset):
    """Indexed by ``(prompt_index, group_id)`` pairs from a group sampler, or by a plain int. Rows with condition
    images give them as ``condition_images`` (:class:`flowrl.conditions.ConditionImages`), decoded here (in the
    DataLoader's workers where there are some)."""

    def __init__(self, prompts: Sequence[str] | PromptRows):
        self.rows = prompts if isinstance(prompts, PromptRows) else PromptRows(list(prompts))
        self.prompts = self.rows.prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, key):
        index, group = key if isinstance(key, tuple) else (key, key)
        item = {"prompt": self.prompts[index], "prompt_index": index, "group_id": group}
        if self.rows.images is not None:
            item["condition_images"] = self.rows.condition(index)
        return item


def collate_prompts(items: list[dict]) -> dict:
    batch = {
        "prompt": [it["prompt"] for it in items],
        "prompt_index": torch.tensor([it["prompt_index"] for it in items], dtype=torch.long),
        "group_id": torch.tensor([it["group_id"] for it in items], dtype=torch.long),
    }
    if "condition_images" in items[0]:
        batch["condition_images"] = [it["condition_images"] for it in items]
    return batch


class GroupBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields per-process batches of ``(prompt_index, group_id)``: whole groups of ``group_size``.

    Every epoch the prompt order is reshuffled from ``seed + epoch`` (identical on all processes);
    each global batch takes ``world_size * prompts_per_batch`` prompts and this process its own
    slice. Group ids are unique within a global batch (``rank * prompts_per_batch + j``) so they
    stay distinct after gathering across processes. The last batch wraps around to stay full.
    """

    def __init__(self, num_prompts: int, group_size: int, batch_size: int, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, start: int = 0):
        validate_group_batch(group_size, batch_size)
        self.num_prompts, self.group_size = num_prompts, group_size
        self.prompts_per_batch = batch_size // group_size
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.epoch = 0
        #: batches already trained on, over all epochs (a resumed run): the first ``start`` are not served again
        self.start = int(start)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_prompts / (self.prompts_per_batch * self.world_size))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_prompts, generator=g).tolist()
        else:
            order = list(range(self.num_prompts))
        per_global = self.prompts_per_batch * self.world_size
        order = order + order * math.ceil(max(0, len(self) * per_global - len(order)) / len(order))
        for b in range(len(self)):
            if self.epoch * len(self) + b < self.start:
                continue  # served before the run was interrupted
            chunk = order[b * per_global:(b + 1) * per_global]
            start = self.rank * self.prompts_per_batch
            batch = []
            for j, index in enumerate(chunk[start:start + self.prompts_per_batch]):
                batch += [(index, start + j)] * self.group_size
            yield batch
        self.epoch += 1


def validate_group_batch(group_size: int, batch_size: int) -> None:
    if group_size < 2:
        raise ConfigError(f"group_size={group_size}: group-relative advantages need at least 2 samples per prompt; set group_size >= 2")
    if batch_size < group_size or batch_size % group_size:
        lower = max(group_size, batch_size // group_size * group_size)
        raise ConfigError(
            f"batch_size={batch_size} does not divide into whole groups of group_size={group_size}; "
            f"use a multiple of {group_size} (e.g. {lower} or {lower + group_size})"
        )


class ValidationPrompts(L.LightningDataModule):
    """What every flowrl DataModule shares: validation prompts, ``val_samples_per_prompt`` times each, split across
    processes, and this process's rank and the number of processes."""

    def _set_validation(self, val_prompts: PromptSource | None, max_val_prompts: int | None, val_batch_size: int,
                        val_samples_per_prompt: int, num_workers: int, image_dir: str | None = None) -> None:
        self.val_rows = load_prompt_rows(val_prompts, "data.val_prompts", image_dir).head(max_val_prompts) if (
            val_prompts is not None) else None
        self.val_prompts = self.val_rows.prompts if self.val_rows is not None else None
        self.val_batch_size, self.val_samples_per_prompt = val_batch_size, val_samples_per_prompt
        self.num_workers = num_workers

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_prompts is None:
            return []
        rank, world = self._rank_world()
        keys = [(i, i) for i in range(len(self.val_prompts)) for _ in range(self.val_samples_per_prompt)]
        keys = keys[rank::world]
        return DataLoader(PromptDataset(self.val_rows), batch_size=self.val_batch_size, sampler=keys,
                          collate_fn=collate_prompts, num_workers=self.num_workers)


class PromptDataModule(ValidationPrompts):
    """Training prompts in whole groups; validation prompts ``val_samples_per_prompt`` times each.

    Args:
        train_prompts: a ``.txt`` file (one prompt a line), a ``.jsonl`` file (a ``prompt`` field a line; editing and
            image-to-video rows also ``images``: their condition image paths, and ``source_prompt``), an
            inline list, or a toy prompt set (``toy:train``, ``toy:train_balanced``, ``toy:heldout``, ``toy:eval``).
        val_prompts: validation prompts, in the same forms; null = no validation.
        group_size: samples per prompt (linked to model.group_size by the CLI).
        batch_size: samples per process and iteration, a multiple of group_size.
        val_batch_size: samples per validation batch.
        val_samples_per_prompt: samples of each validation prompt.
        max_val_prompts: use only the first this many validation prompts; null = all.
        seed: seed of the prompt order (shuffled every epoch).
        num_workers: DataLoader worker processes.
        max_train_prompts: train on the first this many prompts only; null = all (Flow-Factory's
            ``max_dataset_size``).
        image_dir: the folder relative condition-image paths of ``.jsonl`` rows are read from; null = each prompt
            file's own folder.
    """

    def __init__(
        self,
        train_prompts: PromptSource,
        val_prompts: PromptSource | None = None,
        group_size: int = 8,
        batch_size: int = 16,
        val_batch_size: int = 16,
        val_samples_per_prompt: int = 1,
        max_val_prompts: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        max_train_prompts: int | None = None,
        image_dir: str | None = None,
    ):
        super().__init__()
        validate_group_batch(group_size, batch_size)
        check_number("data.max_train_prompts", max_train_prompts, 1, allow_none=True, hint="; null = all")
        if image_dir is not None and not os.path.isdir(os.path.expanduser(image_dir)):
            raise ConfigError(f"data.image_dir={image_dir!r} is not a folder; give the folder the rows' image paths "
                              "are relative to, or null for each prompt file's own folder")
        self.train_rows = load_prompt_rows(train_prompts, "data.train_prompts", image_dir).head(max_train_prompts)
        self.train_prompts = self.train_rows.prompts
        self._set_validation(val_prompts, max_val_prompts, val_batch_size, val_samples_per_prompt, num_workers,
                             image_dir)
        self.group_size, self.batch_size, self.seed = group_size, batch_size, seed

    def state_dict(self) -> dict:
        """How many training batches the run has taken: a resumed run continues with the next one, not with the
        first of the interrupted epoch (saved in every checkpoint by Lightning)."""
        trainer = self.trainer
        done = trainer.fit_loop.epoch_loop.batch_progress.total.ready if trainer is not None else 0
        return {"train_batches_done": int(done)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._start = int(state_dict.get("train_batches_done", 0))

    def _refuse_lightnings_distributed_sampler(self) -> None:
        """With several processes, Lightning's own sampler replacement would split groups (or fail to rebuild the
        group sampler): this DataModule shards whole groups itself."""
        trainer = self.trainer
        connector = getattr(trainer, "_accelerator_connector", None)
        if trainer is not None and trainer.world_size > 1 and getattr(connector, "use_distributed_sampler", False):
            raise ConfigError(
                "PromptDataModule gives every process whole groups itself; create the Trainer with "
                "use_distributed_sampler=False (flowrl fit does)"
            )

    def train_dataloader(self) -> DataLoader:
        self._refuse_lightnings_distributed_sampler()
        rank, world = self._rank_world()
        sampler = GroupBatchSampler(len(self.train_prompts), self.group_size, self.batch_size, True, self.seed, rank,
                                    world, start=getattr(self, "_start", 0))
        return DataLoader(PromptDataset(self.train_rows), batch_sampler=sampler, collate_fn=collate_prompts,
                          num_workers=self.num_workers)
