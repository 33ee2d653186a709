"""Lightning callbacks usable in any project (they depend on torch and lightning only).

- :class:`EMA`: exponential moving average of the trained parameters (all decay schedules).
- :class:`OffPolicySampling`: generate training data with the EMA weights (the "old policy").
- :class:`SamplePlots`: learning curves and a before/after sample grid as PNG at the end of fit.
"""

from .ema import EMA, EMA_DECAY_SCHEDULES, decay_at
from .off_policy import OffPolicySampling, enter_sampling_contexts
from .plots import SamplePlots

__all__ = ["EMA", "EMA_DECAY_SCHEDULES", "OffPolicySampling", "SamplePlots", "decay_at", "enter_sampling_contexts"]
