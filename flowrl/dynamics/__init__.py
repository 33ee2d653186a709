"""Sampling dynamics (SDE/ODE steps), MixGRPO step selection and training-time sampling."""

from flowrl.dynamics.sde import (
    CPS,
    DYNAMICS,
    ODE,
    DanceSDE,
    FlowSDE,
    SDESchedulerMixin,
    StepOutput,
    build_dynamics,
    gaussian_log_prob,
)

__all__ = [
    "CPS",
    "DYNAMICS",
    "ODE",
    "DanceSDE",
    "FlowSDE",
    "SDESchedulerMixin",
    "StepOutput",
    "build_dynamics",
    "gaussian_log_prob",
]
