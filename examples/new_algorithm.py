"""Adding an algorithm, a sampling dynamics and an advantage estimator: each one class or function in a file of
your own, chosen from a YAML by its import path, with no registration and no edit anywhere in flowrl.

* ``Reinforce``: a new algorithm, the plain policy gradient ``loss = -A * log p(step)`` (no ratio clipping) on the
  SDE steps GRPO's rollouts store. Sampling, rewards, advantages, micro-batching, accumulation, gradient
  clipping, logging and the callbacks are the base class's.
* ``EulerMaruyama``: a new dynamics, the Euler step plus ``noise_level * sqrt(-dt)`` Gaussian noise, with the
  Gaussian log-prob every coupled algorithm needs.
* ``dr_grpo``: a new advantage estimator, Dr. GRPO's group-centred reward without the division by the std.

``examples/new_algorithm.yaml`` uses all three on the toy world (``PYTHONPATH=examples`` so that ``new_algorithm``
imports)::

    PYTHONPATH=examples flowrl fit --config lightning_configs/toy/base.yaml --config examples/new_algorithm.yaml
    python examples/new_algorithm.py     # the same from Python, 3 iterations
"""

import lightning as L
import torch

from flowrl.algorithms import GRPO
from flowrl.data import PromptDataModule
from flowrl.dynamics import Dynamics
from flowrl.policy import PolicyConfig
from flowrl.rewards import RewardSpec


class Reinforce(GRPO):
    """The policy gradient of the step log-probs, weighted by the advantages (GRPO's options, no clip_range)."""

    trainer_type = "reinforce"

    def __init__(self, policy: PolicyConfig, **kwargs):
        super().__init__(policy, clip_range=None, **kwargs)

    def policy_loss(self, rollout, advantages, idx, k, out, s, s_next):
        adv = advantages[idx].float()
        ratio = (out.log_prob - rollout.log_probs[idx, k]).exp().detach()  # logged: exactly 1 on-policy
        return {"loss": -(adv * out.log_prob.float()).mean(), "ratio": ratio}


class EulerMaruyama(Dynamics):
    """``prev = x + v * dt + a * sqrt(-dt) * eps``: the Euler step with additive Gaussian noise of level ``a``."""

    name = "Euler-Maruyama"

    def __init__(self, noise_level: float = 0.3):
        if not 0 <= noise_level < 1:
            raise ValueError(f"noise_level of Euler-Maruyama must lie in [0, 1), got {noise_level}")
        self.noise_level = float(noise_level)

    def std_dev_t(self, sigma, sigma_next):
        return torch.full_like(torch.as_tensor(sigma, dtype=torch.float32), self.noise_level)

    def _mean_std(self, x, v, s, s_next):
        dt = s_next - s
        return x + v * dt, self.noise_level * torch.sqrt((-dt).clamp(min=0.0))


def dr_grpo(total, terms, weights, group_ids, global_std=False):
    """Dr. GRPO: ``A = r - mean of r over the sample's group`` (no std division, so no group is up-weighted for
    having similar rewards)."""
    r = total.double()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    sums = torch.zeros(int(inverse.max()) + 1, dtype=torch.float64).index_add_(0, inverse, r)
    counts = torch.zeros_like(sums).index_add_(0, inverse, torch.ones_like(r))
    return (r - (sums / counts)[inverse]).float()


def main(steps=3):
    model = Reinforce(PolicyConfig("flowrl:toy", finetune_type="full"), rewards=[RewardSpec("shapes")], group_size=4,
                      resolution=32, num_inference_steps=6, guidance_scale=4.5, dynamics=EulerMaruyama(0.3),
                      advantage_estimator="new_algorithm.dr_grpo", train_batch_size=8,
                      optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, use_distributed_sampler=False)
    trainer.fit(model, datamodule=PromptDataModule(["a red circle", "two blue squares"], group_size=4, batch_size=8))
    return trainer


if __name__ == "__main__":
    print({k: round(float(v), 4) for k, v in main().logged_metrics.items() if k.startswith("train/")})
