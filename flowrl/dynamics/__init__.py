"""Sampling dynamics (SDE/ODE steps), MixGRPO step selection and training-time sampling."""

from flowrl.dynamics.base import Dynamics, SDESchedulerMixin, StepOutput, gaussian_log_prob
from flowrl.dynamics.sde import CPS, DYNAMICS, ODE, DanceSDE, FlowSDE, build_dynamics
from flowrl.dynamics.selection import SlidingWindow, StepSelector, TrainSteps
from flowrl.dynamics.timesampling import TIME_SAMPLING_STRATEGIES, sample_train_times, shift_sigma

__all__ = [
    "CPS",
    "DYNAMICS",
    "ODE",
    "TIME_SAMPLING_STRATEGIES",
    "DanceSDE",
    "Dynamics",
    "SlidingWindow",
    "TrainSteps",
    "FlowSDE",
    "SDESchedulerMixin",
    "StepOutput",
    "StepSelector",
    "build_dynamics",
    "gaussian_log_prob",
    "sample_train_times",
    "shift_sigma",
]
