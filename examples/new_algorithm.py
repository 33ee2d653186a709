"""Adding an algorithm: one LightningModule subclass that says how stored rollouts become a loss.

Here REINFORCE with group-normalised advantages and no ratio clipping, ``loss = -A * log p(step)``, on the SDE
steps GRPO's rollouts store. Everything else (sampling, rewards, advantages, micro-batching, gradient
accumulation, clipping, logging, callbacks) is the base class's. Registered under a ``trainer_type`` name, it is
also what ``flowrl fit --trainer_type reinforce`` builds (in a process that imported this file first).

    python examples/new_algorithm.py
"""

import lightning as L
import torch

from flowrl.algorithms import ALGORITHMS, GRPO
from flowrl.data import PromptDataModule
from flowrl.policy import PolicyConfig
from flowrl.rewards import RewardSpec


class Reinforce(GRPO):
    """``trainer_type: reinforce``: the policy gradient of the step log-probs, weighted by the advantages."""

    trainer_type = "reinforce"

    def __init__(self, policy: PolicyConfig, **kwargs):
        super().__init__(policy, clip_range=None, **kwargs)

    def policy_loss(self, rollout, advantages, idx, k, out, s, s_next):
        adv = advantages[idx].float()
        ratio = (out.log_prob - rollout.log_probs[idx, k]).exp().detach()  # logged: exactly 1 on-policy
        return {"loss": -(adv * out.log_prob.float()).mean(), "ratio": ratio}


ALGORITHMS["reinforce"] = Reinforce


def main(steps=3):
    model = Reinforce(PolicyConfig("flowrl:toy", finetune_type="full"), rewards=[RewardSpec("shapes")], group_size=4,
                      resolution=32, num_inference_steps=6, guidance_scale=4.5, noise_level=0.7, train_batch_size=8,
                      optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, use_distributed_sampler=False)
    trainer.fit(model, datamodule=PromptDataModule(["a red circle", "two blue squares"], group_size=4, batch_size=8))
    return trainer


if __name__ == "__main__":
    print({k: round(float(v), 4) for k, v in main().logged_metrics.items() if k.startswith("train/")})
