"""flowrl's algorithms inside your own Lightning code: your DataModule, your logger, your ModelCheckpoint.

A batch is a dict with ``prompt`` (a list, every prompt repeated ``group_size`` times, groups contiguous) and
``group_id`` (a tensor naming each sample's group); that is all a flowrl module reads from the data.

    python examples/own_trainer.py --algorithm nft --steps 20
"""

import argparse

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, IterableDataset

from callbacks import EMA, OffPolicySampling
from flowrl.algorithms import GRPO, NFT
from flowrl.dynamics import FlowSDE
from flowrl.policy import PolicyConfig
from flowrl.precision import cpu_precision
from flowrl.rewards import RewardSpec


class RepeatedPrompts(IterableDataset):
    """Endless batches of ``prompts_per_batch`` random prompts, each ``group_size`` times."""

    def __init__(self, prompts, group_size, prompts_per_batch, seed=0):
        self.prompts, self.group_size, self.per_batch, self.seed = prompts, group_size, prompts_per_batch, seed

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        while True:
            chosen = torch.randint(len(self.prompts), (self.per_batch,), generator=g).tolist()
            yield {"prompt": [self.prompts[i] for i in chosen for _ in range(self.group_size)],
                   "group_id": torch.arange(self.per_batch).repeat_interleave(self.group_size)}


class ShapesData(L.LightningDataModule):
    def __init__(self, group_size=8, prompts_per_batch=4):
        super().__init__()
        self.group_size, self.prompts_per_batch = group_size, prompts_per_batch

    def train_dataloader(self):
        prompts = ["a red circle", "two blue squares", "a green triangle left of a yellow circle", "three purple triangles"]
        return DataLoader(RepeatedPrompts(prompts, self.group_size, self.prompts_per_batch), batch_size=None)


def build(algorithm: str, group_size: int):
    common = dict(policy=PolicyConfig("flowrl:toy", finetune_type="lora", lora_rank=16), rewards=[RewardSpec("shapes")],
                  group_size=group_size, resolution=32, num_inference_steps=10, guidance_scale=4.5,
                  train_batch_size=16, optimizer=lambda params: torch.optim.AdamW(params, lr=2e-3))
    if algorithm == "nft":  # ODE rollouts, re-noised at 3 times in the high-noise 30% of the schedule
        return NFT(**common, num_train_timesteps=3, timestep_fraction=0.3)
    return GRPO(**common, dynamics=FlowSDE(noise_level=0.7), clip_range=1e-4)


def main(algorithm="nft", steps=20, group_size=8, prompts_per_batch=4, out="runs/own-trainer"):
    model = build(algorithm, group_size)
    callbacks = [ModelCheckpoint(dirpath=f"{out}/checkpoints", save_last=True)]
    if algorithm == "nft":  # the EMA weights sample the rollouts and are NFT's "old" policy
        callbacks += [EMA(ema_decay=0.5, ema_decay_schedule="piecewise_linear", ramp_rate=0.005),
                      OffPolicySampling(off_policy=True)]
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", precision=cpu_precision(model), logger=CSVLogger(out),
                        callbacks=callbacks, log_every_n_steps=1, enable_progress_bar=False)
    trainer.fit(model, datamodule=ShapesData(group_size, prompts_per_batch))
    return trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--algorithm", choices=["nft", "grpo"], default="nft")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    trainer = main(args.algorithm, args.steps)
    print({k: round(float(v), 4) for k, v in trainer.logged_metrics.items() if k.startswith("train/reward")})
