"""Times a user can trust: the seconds per step and the estimated time to the end and to the next validation, as a
plain log line (it shows where a progress bar does not: output to a file or a CI log)."""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["IterationTimes", "format_duration"]


def format_duration(seconds: float) -> str:
    """``45 s``, ``3 min 20 s``, ``1 h 05 min``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class IterationTimes(L.Callback):
    """Every ``every_n_steps`` optimizer steps (first after ``warmup_steps``), one line: seconds per step (training
    only, measured since the warm-up), the estimated time to ``max_steps`` (training plus the validations still to
    come, each as long as the last one, the "before" validation of ``num_sanity_val_steps: -1`` included) and to the
    next validation.

    Args:
        every_n_steps: steps between two lines.
        warmup_steps: steps left out of the average (the first ones pay one-off costs: caches, allocations).
    """

    def __init__(self, every_n_steps: int = 10, warmup_steps: int = 2):
        if every_n_steps < 1 or warmup_steps < 0:
            raise ValueError(f"every_n_steps must be >= 1 and warmup_steps >= 0, got {every_n_steps}, {warmup_steps}")
        self.every_n_steps, self.warmup_steps = every_n_steps, warmup_steps
        self.train_seconds, self.timed_steps, self.timed_batches = 0.0, 0, 0
        self.validation_seconds: float | None = None
        self.lines: list[str] = []
        self._batch_start = self._validation_start = None
        self._steps_at_batch_start = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch_start, self._steps_at_batch_start = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._batch_start is None:
            return
        steps = trainer.global_step - self._steps_at_batch_start
        if trainer.global_step > self.warmup_steps and steps > 0:
            self.train_seconds += time.perf_counter() - self._batch_start
            self.timed_steps += steps
            self.timed_batches += 1
        done = trainer.global_step
        if self.timed_steps and steps > 0 and done >= self.warmup_steps + 1 and \
                (done - self.warmup_steps - 1) % self.every_n_steps == 0:
            self.report(trainer)

    def on_validation_start(self, trainer, pl_module):
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        # A sanity check that ran the whole validation (``num_sanity_val_steps: -1``, a "before" evaluation) times
        # one too; a partial one (a few batches) does not stand for a validation.
        whole = not trainer.sanity_checking or trainer.num_sanity_val_steps == float("inf")
        if self._validation_start is not None and whole:
            self.validation_seconds = time.perf_counter() - self._validation_start

    def report(self, trainer) -> str:
        """The line for now (called from ``on_train_batch_end``: a validation due at this batch runs right after)."""
        per_step, per_batch = self.train_seconds / self.timed_steps, self.train_seconds / self.timed_batches
        done, total = trainer.global_step, trainer.max_steps
        batches = trainer.fit_loop.epoch_loop.total_batch_idx + 1  # training batches (iterations) so far
        interval = trainer.val_check_batch if isinstance(trainer.val_check_batch, int) and trainer.limit_val_batches \
            else None
        due_now = bool(interval) and batches % interval == 0
        line = f"[flowrl] step {done}: {per_step:.2f} s per step"
        if total and total > 0:
            batches_left = max(total - done, 0) * per_step / per_batch
            validations = ((int(batches + batches_left) // interval - batches // interval + due_now)
                           if interval else 0)
            eta = max(total - done, 0) * per_step + validations * (self.validation_seconds or 0.0)
            line += f"; about {format_duration(eta)} to step {total}"
            if validations and self.validation_seconds is None:
                line += f" (plus {validations} validation(s) not yet timed)"
        if due_now:
            line += "; validating now"
        elif interval:
            to_next = interval - batches % interval
            line += f"; {format_duration(to_next * per_batch)} to the next validation (iteration {batches + to_next})"
        rank_zero_info(line)
        self.lines.append(line)
        return line
