"""Which sampling steps are stochastic and trained (Flow-GRPO-Fast / MixGRPO style).

At each iteration :class:`StepSelector` returns the sorted step indices that use the SDE rule
and are trained on; every other step uses the ODE rule. Step ``i`` goes from ``sigmas[i]`` to
``sigmas[i + 1]``; the last step (``i = N - 1``, ``sigma_next = 0``) is never a candidate because
CPS has std 0 there and the step carries no exploration worth training on.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from flowrl.errors import ConfigError

__all__ = ["SlidingWindow", "StepSelector", "TrainSteps"]


class StepSelector:
    """Per-iteration choice of the trained (SDE) sampling steps.

    Candidates are ``train_steps`` (default: every step but the last, ``0 .. N - 2``).

    * Random mode (``window_size`` None): draw ``num_train_steps`` of the candidates (default:
      all of them) without replacement. The draw is seeded by ``(seed, iteration)`` only, so it
      is reproducible and identical on every process.
    * Progressive sliding window (MixGRPO, ``window_size`` set): the window covers
      ``window_size`` consecutive step indices starting at ``start``; ``start`` begins at 0 and
      moves forward by ``window_stride`` every ``window_shift_interval`` iterations. When the
      next move would carry the window past the last trainable step ``N - 2``, it *wraps*:
      starts run ``0, stride, 2 stride, ... <= N - 1 - window_size`` and then begin again at 0,
      so a long run keeps sweeping from high to low noise. The selection is the window's steps
      that are candidates; if ``num_train_steps`` is also set, that many of them are drawn
      (seeded as above; all of them when the window holds fewer).

    Args:
        num_inference_steps: number of sampling steps ``N`` (>= 2).
        train_steps: candidate step indices in ``[0, N - 2]``; None = all of them.
        num_train_steps: how many candidates to train per iteration; None = all.
        seed: base seed of the draws.
        window_size: size of the progressive window; None disables it.
        window_shift_interval: iterations between two window moves (required with a window).
        window_stride: steps the window moves by.
    """

    def __init__(
        self,
        num_inference_steps: int,
        train_steps: Sequence[int] | None = None,
        num_train_steps: int | None = None,
        seed: int = 0,
        window_size: int | None = None,
        window_shift_interval: int | None = None,
        window_stride: int = 1,
    ) -> None:
        if num_inference_steps < 2:
            raise ConfigError(
                f"num_inference_steps must be >= 2 (the last step is never trained), got {num_inference_steps}"
            )
        self.num_inference_steps = int(num_inference_steps)
        last = self.num_inference_steps - 2
        if train_steps is None:
            candidates = list(range(last + 1))
        else:
            candidates = [int(i) for i in train_steps]
            if not candidates:
                raise ConfigError(
                    "train_steps is empty; list at least one step index or set it to null (all steps)"
                )
            bad = [i for i in candidates if not 0 <= i <= last]
            if bad:
                raise ConfigError(
                    f"train_steps {bad} out of range: valid step indices are 0..{last} "
                    f"(num_inference_steps={num_inference_steps}; the last step {last + 1} has sigma_next=0)"
                )
            dupes = sorted({i for i in candidates if candidates.count(i) > 1})
            if dupes:
                raise ConfigError(f"train_steps lists {dupes} more than once; list each step index once")
        self.train_steps: list[int] = sorted(candidates)

        if num_train_steps is not None:
            if num_train_steps < 1:
                raise ConfigError(
                    f"num_train_steps must be >= 1 (or null for all train_steps), got {num_train_steps}"
                )
            if num_train_steps > len(self.train_steps):
                raise ConfigError(
                    f"num_train_steps={num_train_steps} exceeds the {len(self.train_steps)} candidate steps; "
                    f"lower it to at most {len(self.train_steps)} or add train_steps"
                )
        self.num_train_steps = num_train_steps
        self.seed = int(seed)

        self.window_size = window_size
        self.window_shift_interval = window_shift_interval
        self.window_stride = int(window_stride)
        if window_size is not None:
            if not 1 <= window_size <= last + 1:
                raise ConfigError(
                    f"window_size must lie in 1..{last + 1} (the trainable steps 0..{last}), got {window_size}"
                )
            if window_shift_interval is None or window_shift_interval < 1:
                raise ConfigError(
                    f"window_shift_interval must be an integer >= 1 with window_size set, got {window_shift_interval}"
                )
            if self.window_stride < 1:
                raise ConfigError(f"window_stride must be >= 1, got {window_stride}")
            empty = [s for s in range(self._num_window_starts()) if not self._window_steps(s)]
            if empty:
                raise ConfigError(
                    f"the window of size {window_size} starting at step(s) {empty} holds none of train_steps "
                    f"{self.train_steps}; enlarge window_size or widen train_steps"
                )

    def _num_window_starts(self) -> int:
        """Number of distinct window starts: ``0 .. (N - 1) - window_size``."""
        assert self.window_size is not None
        return self.num_inference_steps - 1 - self.window_size + 1

    def _window_steps(self, start: int) -> list[int]:
        assert self.window_size is not None
        allowed = set(self.train_steps)
        return [i for i in range(start, start + self.window_size) if i in allowed]

    def window_start(self, iteration: int) -> int:
        """First step of the progressive window at ``iteration`` (wrapping to 0 past the end)."""
        if self.window_size is None or self.window_shift_interval is None:
            raise ConfigError("window_start needs window_size and window_shift_interval")
        shifts = max(int(iteration), 0) // self.window_shift_interval
        max_start = self._num_window_starts() - 1
        positions_per_sweep = max_start // self.window_stride + 1  # starts 0, stride, ... <= max_start
        return (shifts % positions_per_sweep) * self.window_stride

    def _draw(self, candidates: list[int], k: int, iteration: int) -> list[int]:
        # str seeds are hashed with sha512 by `random`: stable across processes and runs
        rng = random.Random(f"flowrl.StepSelector:{self.seed}:{int(iteration)}")
        return sorted(rng.sample(candidates, k))

    def select(self, iteration: int) -> list[int]:
        """Sorted 0-based step indices that use the SDE and are trained at ``iteration``."""
        if self.window_size is not None:
            candidates = self._window_steps(self.window_start(iteration))
        else:
            candidates = self.train_steps
        if self.num_train_steps is None or self.num_train_steps >= len(candidates):
            return list(candidates)
        return self._draw(candidates, self.num_train_steps, iteration)

    def __repr__(self) -> str:
        return (
            f"StepSelector(num_inference_steps={self.num_inference_steps}, train_steps={self.train_steps}, "
            f"num_train_steps={self.num_train_steps}, seed={self.seed}, window_size={self.window_size}, "
            f"window_shift_interval={self.window_shift_interval}, window_stride={self.window_stride})"
        )


class TrainSteps:
    """The trained (stochastic) steps as a config component: each iteration draws ``num_train_steps`` of
    ``train_steps`` (Flow-GRPO-Fast, MixGRPO's random variant), or of the steps inside MixGRPO's progressive window
    (``window_size`` consecutive steps, from the noisiest, moving ``window_stride`` steps later every
    ``window_shift_interval`` iterations and wrapping back to step 0); every other step uses the ODE.

    Args:
        train_steps: candidate step indices in [0, num_inference_steps - 2]; null = all of them.
        num_train_steps: how many candidates to train per iteration, drawn at random; null = all.
        window_size: steps in MixGRPO's sliding window; null = no window.
        window_shift_interval: iterations between two moves of the window (needed with window_size).
        window_stride: steps the window moves by.
    """

    def __init__(self, train_steps: list[int] | None = None, num_train_steps: int | None = None,
                 window_size: int | None = None, window_shift_interval: int | None = None,
                 window_stride: int = 1) -> None:
        self.train_steps = None if train_steps is None else [int(i) for i in train_steps]
        self.num_train_steps = num_train_steps
        self.window_size, self.window_shift_interval = window_size, window_shift_interval
        self.window_stride = 1 if window_stride is None else window_stride

    @property
    def is_default(self) -> bool:
        """Every step but the last, every iteration."""
        return (self.train_steps is None and self.num_train_steps is None and self.window_size is None
                and self.window_shift_interval is None and self.window_stride == 1)

    def bind(self, num_inference_steps: int, seed: int) -> StepSelector:
        """The selector of a run with ``num_inference_steps`` sampling steps (raises on a step out of range)."""
        return StepSelector(num_inference_steps, self.train_steps, self.num_train_steps, seed, self.window_size,
                            self.window_shift_interval, self.window_stride)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(train_steps={self.train_steps}, num_train_steps={self.num_train_steps}, "
                f"window_size={self.window_size}, window_shift_interval={self.window_shift_interval}, "
                f"window_stride={self.window_stride})")


class SlidingWindow(TrainSteps):
    """:class:`TrainSteps` with MixGRPO's progressive window (``window_size`` and ``window_shift_interval`` required).

    Args:
        window_size: steps in the window.
        window_shift_interval: iterations between two moves of the window.
        window_stride: steps the window moves by.
        train_steps: the steps the window may hold; null = all.
        num_train_steps: train this many of the window's steps, drawn at random; null = all.
    """

    def __init__(self, window_size: int, window_shift_interval: int, window_stride: int = 1,
                 train_steps: list[int] | None = None, num_train_steps: int | None = None) -> None:
        super().__init__(train_steps, num_train_steps, window_size, window_shift_interval, window_stride)
