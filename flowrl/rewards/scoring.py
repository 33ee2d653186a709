"""Asynchronous scoring: each sampled micro-batch is scored in a background thread while the next one samples."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from flowrl.rewards.base import RewardScores, WeightedReward

__all__ = ["AsyncScorer"]


class AsyncScorer:
    """A context manager: ``submit(slice, images)`` queues one micro-batch, ``result()`` waits for all and returns
    the :class:`RewardScores` that :meth:`WeightedReward.score` would give for the whole batch.

    One worker thread scores the micro-batches in order. Leaving the context (normally, on an exception or on
    Ctrl-C) cancels what has not started and waits for the running one, so no thread outlives the iteration.
    Pointwise rewards only: a groupwise reward needs whole groups (the module refuses the combination).
    """

    def __init__(self, reward_fn: WeightedReward, prompts: Sequence[str], conditions: Sequence | None = None):
        self.reward_fn, self.prompts = reward_fn, list(prompts)
        self.conditions = None if conditions is None else list(conditions)
        self._pool: ThreadPoolExecutor | None = None
        self._futures: list[Future] = []

    def __enter__(self) -> AsyncScorer:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowrl-reward")
        return self

    def submit(self, sl: slice, images: torch.Tensor) -> None:
        conditions = None if self.conditions is None else self.conditions[sl]
        self._futures.append(self._pool.submit(self.reward_fn.score, images.detach(), self.prompts[sl], None,
                                               conditions))

    def result(self) -> RewardScores:
        return RewardScores.cat([f.result() for f in self._futures])

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None
