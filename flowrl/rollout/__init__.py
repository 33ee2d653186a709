"""Drawing rollouts without a Trainer: the :class:`Rollout` record, seeded generators and the :class:`RolloutSampler`.

Nothing here imports Lightning: training, validation, ``flowrl sample`` and a notebook share the same sampler.
"""

from flowrl.rollout.record import ForwardProcess, Rollout
from flowrl.rollout.sampler import RolloutSampler, slices
from flowrl.rollout.seeding import keyed_generator, per_sample_generators
from flowrl.rollout.storage import STORAGE_DTYPES, RolloutStorage, StoredTensor

__all__ = ["STORAGE_DTYPES", "ForwardProcess", "Rollout", "RolloutSampler", "RolloutStorage", "StoredTensor",
           "keyed_generator", "per_sample_generators", "slices"]
