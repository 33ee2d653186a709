"""Lightning callbacks usable in any project (they depend on torch and lightning only).

- :class:`EMA`: exponential moving average of the trained parameters (all decay schedules).
- :class:`OffPolicySampling`: generate training data with the EMA weights (the "old policy").
- :class:`ReferenceModel`: the frozen reference of a KL penalty (``kl_beta``, ``kl_type``, ``ref_param_device``).
- :class:`SamplePlots`: learning curves and a before/after sample grid as PNG at the end of fit.
- :class:`IterationTimes`: seconds per step and the time to the end and to the next validation, as a log line.
- :class:`RewardHackingGuard`: the training reward against a held-out gold metric; warn, stop or roll back.
- :class:`FSDP2Strategy`: FSDP2 (``ModelParallelStrategy``) whose checkpoints also hold the callbacks' shards.
"""

from .ema import EMA, EMA_DECAY_SCHEDULES, decay_at
from .fsdp2 import FSDP2Strategy
from .guard import GUARD_ACTIONS, RewardHackingGuard
from .off_policy import OffPolicySampling, enter_sampling_contexts
from .plots import SamplePlots
from .reference import KL_TYPES, ReferenceModel
from .timing import IterationTimes

__all__ = [
    "EMA",
    "EMA_DECAY_SCHEDULES",
    "FSDP2Strategy",
    "GUARD_ACTIONS",
    "IterationTimes",
    "KL_TYPES",
    "OffPolicySampling",
    "ReferenceModel",
    "RewardHackingGuard",
    "SamplePlots",
    "decay_at",
    "enter_sampling_contexts",
]
