"""``SamplePlots``: learning curves and sample grids, written as PNG (+ JSON) at every validation.

Generic: it reads ``trainer.callback_metrics`` after every training batch, the module's
``last_validation_metrics`` dict (if it has one, so that a pre-training validation run during the
sanity check counts too) or the logged ``val_prefix`` metrics after every validation, and the
``images`` / ``prompts`` entries of what ``validation_step`` returns for the first batch.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import lightning.pytorch as pl
import torch


class SamplePlots(pl.Callback):
    """After every validation (the sanity-check one included) rank 0 rewrites ``history.json`` (training and
    validation metrics by optimizer step), ``curves.png``, ``samples_before_after.png`` (the first validation's
    samples above the latest's) and ``samples/step_<N>.png`` (that validation's samples), and hands the sample
    grid to every TensorBoard logger of the trainer (``val/samples``).

    Args:
        train_keys: training metrics to record and plot (from ``trainer.callback_metrics``).
        val_prefix: prefix of the validation metrics to record when the module has no ``last_validation_metrics``.
        num_samples: validation samples in each grid (from the first validation batch: order the validation prompts
            so that its first ones are the set to watch, as the toy's category-interleaved ``toy:eval`` is).
        per_row: images in each grid row.
        dirpath: where the files go; null = the trainer's log folder.

    Validation metrics whose name holds ``diversity`` (flowrl's ``val/diversity_pixel``, ``val/diversity_colour``)
    get a panel of their own in ``curves.png``: their scale is not an accuracy's.
    """

    def __init__(
        self,
        train_keys: Sequence[str] = ("train/reward_mean",),
        val_prefix: str = "val/",
        num_samples: int = 16,
        per_row: int = 8,
        dirpath: str | None = None,
    ):
        if num_samples < 1 or per_row < 1:
            raise ValueError(f"SamplePlots: num_samples ({num_samples}) and per_row ({per_row}) must be at least 1")
        self.train_keys, self.val_prefix = list(train_keys), val_prefix
        self.num_samples, self.per_row, self.dirpath = num_samples, per_row, dirpath
        self.train_history: list[dict] = []
        self.val_history: list[dict] = []
        self.first_samples: tuple[torch.Tensor, list[str]] | None = None
        self.last_samples: tuple[torch.Tensor, list[str]] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        row = {k: float(trainer.callback_metrics[k]) for k in self.train_keys if k in trainer.callback_metrics}
        if row:
            self.train_history.append({"step": trainer.global_step, **row})

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx != 0 or not isinstance(outputs, dict) or "images" not in outputs:
            return
        samples = (outputs["images"][: self.num_samples].detach().float().cpu(), list(outputs["prompts"])[: self.num_samples])
        if self.first_samples is None:
            self.first_samples = samples
        self.last_samples = samples

    def on_validation_end(self, trainer, pl_module):
        # After the module's own epoch-end hook (callbacks' epoch-end hooks run before it).
        metrics = getattr(pl_module, "last_validation_metrics", None)
        if metrics is None:
            metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith(self.val_prefix)}
        row = {k: float(v) for k, v in metrics.items()}
        if row:
            self.val_history.append({"step": trainer.global_step, **row})
        out = self._out_dir(trainer)  # on every process: trainer.log_dir is a collective under DDP
        if trainer.global_rank == 0:
            self.write(trainer, out)
            self._log_images(trainer)

    def state_dict(self):
        return {"train_history": self.train_history, "val_history": self.val_history}

    def load_state_dict(self, state_dict):
        self.train_history = state_dict.get("train_history", [])
        self.val_history = state_dict.get("val_history", [])

    def on_fit_end(self, trainer, pl_module):
        out = self._out_dir(trainer)
        if trainer.global_rank == 0:
            self.write(trainer, out, latest_grid=False)  # the training curve's last points

    def _out_dir(self, trainer) -> str:
        return self.dirpath or trainer.log_dir or trainer.default_root_dir

    def write(self, trainer, out: str, latest_grid: bool = True) -> None:
        """history.json, curves.png and the sample grids, into ``out`` (rank 0 only)."""
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "history.json"), "w") as f:
            json.dump({"train": self.train_history, "val": self.val_history}, f, indent=1)
        self.plot_curves(os.path.join(out, "curves.png"))
        if self.first_samples is not None:
            self.plot_grid(os.path.join(out, "samples_before_after.png"))
        if latest_grid and self.last_samples is not None:
            os.makedirs(os.path.join(out, "samples"), exist_ok=True)
            self.plot_grid(os.path.join(out, "samples", f"step_{trainer.global_step:06d}.png"),
                           rows=[(f"step {trainer.global_step}", self.last_samples)])

    def _log_images(self, trainer) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        if self.last_samples is None:
            return
        images = self.last_samples[0]
        images = images[:, 0] if images.ndim == 5 else images  # first frame of a video
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_images("val/samples", images.clamp(0, 1), trainer.global_step)

    def plot_curves(self, path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = sorted({k for r in self.val_history for k in r if k != "step"})
        panels = [("validation", [k for k in keys if "diversity" not in k]), ("diversity", [k for k in keys if "diversity" in k])]
        panels = [p for p in panels if p[1]] or [("validation", [])]
        fig, axes = plt.subplots(1, 1 + len(panels), figsize=(5.5 * (1 + len(panels)), 4))
        for key in self.train_keys:
            pts = [(r["step"], r[key]) for r in self.train_history if key in r]
            if pts:
                axes[0].plot(*zip(*pts), label=key)
        axes[0].set_xlabel("optimizer step")
        axes[0].set_title("training")
        for ax, (title, panel_keys) in zip(axes[1:], panels):
            for key in panel_keys:
                pts = [(r["step"], r[key]) for r in self.val_history if key in r]
                ax.plot(*zip(*pts), marker="o", label=key.removeprefix(self.val_prefix))
            ax.set_xlabel("optimizer step")
            ax.set_title(title)
        for ax in axes:
            if ax.lines:
                ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def plot_grid(self, path: str, rows: list | None = None) -> None:
        """A grid of ``rows`` (``[(label, (images, prompts)), ...]``; default: before and after): grid rows of up
        to ``per_row`` images per label, each image captioned with its prompt."""
        rows = rows or [("before", self.first_samples), ("after", self.last_samples)]
        per_row = min(self.per_row, len(rows[0][1][1]))
        images, captions, labels = [], [], []
        for label, (imgs, prompts) in rows:
            imgs = imgs[:, 0] if imgs.ndim == 5 else imgs  # first frame of a video
            for start in range(0, len(prompts), per_row):
                chunk = list(range(start, min(start + per_row, len(prompts))))
                images += [imgs[i] for i in chunk] + [torch.zeros_like(imgs[0])] * (per_row - len(chunk))
                captions += [prompts[i] for i in chunk] + [""] * (per_row - len(chunk))
                labels.append(label)
        save_grid(torch.stack(images), path, per_row, captions=captions, row_labels=labels, label_width=60)


def _wrap(text: str, width: int) -> list[str]:
    lines = [""]
    for word in text.split():
        if lines[-1] and len(lines[-1]) + 1 + len(word) > width:
            lines.append(word)
        else:
            lines[-1] = f"{lines[-1]} {word}".strip()
    return lines


def save_grid(images: torch.Tensor, path: str, per_row: int, captions=None, row_labels=None,
              min_cell: int = 128, label_width: int = 160) -> str:
    """Images ``(N, C, H, W)`` in [0, 1] as a PNG grid of ``per_row`` columns, enlarged (nearest neighbour) to at
    least ``min_cell`` pixels, a caption under each image and a label left of each row (wrapped text).

    Drawn with Pillow (which matplotlib depends on) rather than a matplotlib figure: ten times faster, and it runs
    at every validation."""
    from PIL import Image, ImageDraw, ImageFont

    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    pictures = [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
    scale = max(1, math.ceil(min_cell / max(pictures[0].size)))
    w, h = pictures[0].width * scale, pictures[0].height * scale
    chars = max(8, w // 6)
    caption_lines = max((len(_wrap(c, chars)) for c in captions or [""]), default=0)
    caption_h, pad = (12 * min(caption_lines, 3) + 2 if captions else 0), 4
    label_w = label_width if row_labels else 0
    rows = math.ceil(len(pictures) / per_row)
    grid = Image.new("RGB", (label_w + per_row * (w + pad), rows * (h + caption_h + pad)), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for i, picture in enumerate(pictures):
        r, c = divmod(i, per_row)
        x, y = label_w + c * (w + pad), r * (h + caption_h + pad)
        grid.paste(picture.convert("RGB").resize((w, h), Image.NEAREST), (x, y))
        if captions and captions[i]:
            draw.multiline_text((x + 1, y + h + 1), "\n".join(_wrap(str(captions[i]), chars)[:3]), fill="black",
                                font=font, spacing=1)
        if row_labels and c == 0:
            draw.multiline_text((4, y + 4), "\n".join(_wrap(row_labels[r], label_w // 6)), fill="black", font=font)
    grid.save(path)
    return path
