"""Advantage estimators (registered by name, as verl's ``core_algos`` registers them) and cross-process gathering.

For the ``G`` samples of one prompt (one *group*)::

    A_i = (r_i - mean_group(r)) / (std + eps)

where ``std`` is the group's std, or with ``global_std=True`` the std of the whole batch (all
ranks once gathered). The std is the *population* std (``ddof = 0``, numpy's default, which the
reference Flow-GRPO stat tracker uses), and ``eps = 1e-4`` as there. A group whose rewards are
all equal gets advantage 0 (not nan); a group of one sample gets 0 too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from flowrl.errors import ConfigError
from flowrl.imports import import_class_path

__all__ = ["ADVANTAGE_ESTIMATORS", "AdvantageEstimator", "estimate_advantages", "gather_groups", "gdpo_advantages",
           "group_advantages", "register_advantage_estimator", "resolve_advantage_estimator"]


class AdvantageEstimator(Protocol):
    """``estimator(total, terms, weights, group_ids, global_std) -> (N,)`` float32 advantages.

    ``total``: ``(N,)`` weighted sum of the rewards; ``terms``: ``(K, N)`` each reward's scores; ``weights``: ``(K,)``;
    ``group_ids``: ``(N,)`` (samples of one prompt share an id); ``global_std``: normalise by the batch's std instead
    of the group's, where the estimator divides by a std. Every sample of every process is passed at once."""

    def __call__(self, total: Tensor, terms: Tensor, weights: Tensor, group_ids: Tensor,
                 global_std: bool = False) -> Tensor: ...


#: the built-in estimators by name (``advantage_estimator`` of an algorithm); a dotted import path names any other
ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage_estimator(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: ``@register_advantage_estimator("mine")`` makes ``advantage_estimator: mine`` choose a function."""

    def register(fn: AdvantageEstimator) -> AdvantageEstimator:
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return register


def resolve_advantage_estimator(name: str) -> AdvantageEstimator:
    """A registered name, or the import path of a function (``my_package.estimators.dr_grpo``)."""
    if name in ADVANTAGE_ESTIMATORS:
        return ADVANTAGE_ESTIMATORS[name]
    if "." not in name:
        raise ConfigError(f"advantage_estimator {name!r} is not registered; choose one of "
                          f"{', '.join(sorted(ADVANTAGE_ESTIMATORS))}, or give the import path of a function")
    fn = import_class_path(name)
    if not callable(fn):
        raise ConfigError(f"advantage_estimator {name!r} is not callable")
    return fn


def _check_flat(rewards: Tensor, group_ids: Tensor) -> None:
    if rewards.ndim != 1:
        raise ValueError(
            f"rewards must be a 1-D tensor (one scalar per sample), got shape {tuple(rewards.shape)}"
        )
    if group_ids.shape != rewards.shape:
        raise ValueError(
            f"group_ids must have one id per reward: shapes {tuple(group_ids.shape)} vs {tuple(rewards.shape)}"
        )


def group_advantages(
    rewards: Tensor, group_ids: Tensor, global_std: bool = False, eps: float = 1e-4
) -> Tensor:
    """Group-normalised advantages, float32, shape ``(N,)``.

    ``A = (r - mean of r over the sample's group) / (std + eps)`` with the population std of the
    sample's group, or of the whole batch when ``global_std`` is True. Computed in float64.

    Args:
        rewards: ``(N,)`` rewards.
        group_ids: ``(N,)`` integer ids; samples sharing an id form one group (one prompt).
        global_std: divide by the std of all ``N`` rewards instead of the group's std.
        eps: added to the std.
    """
    _check_flat(rewards, group_ids)
    r = rewards.detach().to(torch.float64)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max().item()) + 1 if inverse.numel() else 0
    counts = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(
        0, inverse, torch.ones_like(r)
    )
    sums = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, inverse, r)
    group_mean = (sums / counts)[inverse]
    centered = r - group_mean
    if global_std:
        std = r.std(unbiased=False) if r.numel() else r.new_zeros(())
    else:
        sq = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, inverse, centered**2)
        std = torch.sqrt(sq / counts)[inverse]
    return (centered / (std + eps)).to(torch.float32)


def gdpo_advantages(
    terms: Tensor, weights: Tensor, group_ids: Tensor, global_std: bool = False, eps: float = 1e-4
) -> Tensor:
    """GDPO (group reward-decoupled normalisation) for ``K`` rewards, float32 ``(N,)``.

    Each reward is group-normalised on its own (:func:`group_advantages`), the normalised terms are summed
    with their ``weights``, and the sum is normalised over the whole batch: ``A = (S - mean(S)) / (std(S) + eps)``
    (population std). A reward of a large scale then no longer drowns a small but discriminative one, as it
    does when the weighted *sum* of rewards is normalised (``advantage_aggregation: sum``).

    Args:
        terms: ``(K, N)`` rewards, one row per reward.
        weights: ``(K,)`` weights.
    """
    if terms.ndim != 2 or weights.shape != (terms.shape[0],):
        raise ValueError(f"gdpo_advantages needs (K, N) terms and (K,) weights, got {tuple(terms.shape)} and {tuple(weights.shape)}")
    per_term = torch.stack([group_advantages(t, group_ids, global_std, eps).double() for t in terms])
    total = (weights.double()[:, None] * per_term).sum(0)
    return ((total - total.mean()) / (total.std(unbiased=False) + eps)).to(torch.float32)


def gather_groups(
    rewards: Tensor, group_ids: Tensor, all_gather: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    """Gather the rewards and group ids of every process into flat tensors.

    ``all_gather`` is a Lightning-style callable (``LightningModule.all_gather``): on ``W > 1``
    processes it returns the ``(W, N, ...)`` stack of every rank's tensor, with one process it may
    return the tensor unchanged; both are handled. Every rank must pass the same ``N``.

    The result is rank-major: rank ``k``'s samples are ``[k * N, (k + 1) * N)``, so after
    ``A = group_advantages(*gather_groups(...))`` a rank takes its own part with
    ``A.view(W, N)[rank]`` (or ``A[rank * N:(rank + 1) * N]``).

    Group ids must be globally unique: the same id on two ranks means the same group (e.g. a
    global prompt index, as produced by a group-keeping sampler), and two different prompts must
    never share an id across ranks (offset local ids by ``rank * groups_per_rank`` if needed).
    """
    _check_flat(rewards, group_ids)
    gathered_r = all_gather(rewards)
    gathered_g = all_gather(group_ids)
    if gathered_r.ndim == rewards.ndim + 1:
        gathered_r = gathered_r.reshape(-1)
        gathered_g = gathered_g.reshape(-1)
    if gathered_r.shape != gathered_g.shape:
        raise ValueError("all_gather returned rewards and group ids of different shapes")
    return gathered_r, gathered_g


@register_advantage_estimator("group")
def group_estimator(total: Tensor, terms: Tensor, weights: Tensor, group_ids: Tensor, global_std: bool = False) -> Tensor:
    """Flow-GRPO's: the weighted sum of the rewards, normalised within each group (:func:`group_advantages`)."""
    return group_advantages(total, group_ids, global_std=global_std)


@register_advantage_estimator("gdpo")
def gdpo_estimator(total: Tensor, terms: Tensor, weights: Tensor, group_ids: Tensor, global_std: bool = False) -> Tensor:
    """GDPO: each reward normalised within its group, their weighted sum normalised over the batch
    (:func:`gdpo_advantages`)."""
    return gdpo_advantages(terms, weights, group_ids, global_std=global_std)


def estimate_advantages(estimator: AdvantageEstimator, total: Tensor, terms: Tensor, weights: Tensor,
                        group_ids: Tensor, keep: Tensor | None = None, global_std: bool = False,
                        gather: Callable[[Tensor], Tensor] | None = None, rank: int = 0) -> Tensor:
    """This process's ``(N,)`` advantages. With several processes ``gather`` (an all-gather returning every rank's
    tensor, rank-major) collects every group first, and the estimator sees the whole global batch. Samples outside
    ``keep`` (dropped groups) get advantage 0 and take no part in the statistics."""
    n = total.shape[0]
    total, terms = total.float(), terms.float()
    if gather is not None:
        total, group_ids = gather(total), gather(group_ids)
        terms = torch.stack([gather(t) for t in terms]) if len(terms) else terms.reshape(0, total.shape[0])
    mask = torch.ones(total.shape[0], dtype=torch.bool) if keep is None else keep
    adv = torch.zeros(total.shape[0])
    adv[mask] = estimator(total[mask], terms[:, mask], weights, group_ids[mask], global_std=global_std)
    return adv[rank * n:(rank + 1) * n] if adv.shape[0] != n else adv
