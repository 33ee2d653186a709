"""A ``flowrl fit`` of a toy config on 2 CPU processes (gloo), for tests/e2e/test_ddp.py (run as a script: Lightning's
``ddp`` strategy starts rank 1 by running this file again).

    python tests/e2e/ddp_run.py OUT_DIR CONFIG [flowrl fit overrides ...]

Each rank writes ``OUT_DIR/rank<r>.json``: a checksum of the trained parameters, the per-step metrics and how many
gradient all-reduce buckets the DDP communication hook saw.
"""

import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # test_cli (its tiny_overrides)
sys.path.insert(0, os.path.dirname(HERE))  # tests/: tiny, conftest
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository


class FailOnRank1:
    """A reward that raises on the process of global rank 1 only."""

    def __call__(self, images, prompts):
        if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 1:
            raise RuntimeError("reward server of rank 1 is down")
        return torch.rand(len(prompts))


BUCKETS = {"n": 0}
BACKWARDS = []  # (sync asked, all-reduce buckets during that backward) of every backward pass
ADVANTAGES = []  # this process's rewards and advantages, every iteration


def counting_allreduce_hook(state, bucket):
    """DDP's default all-reduce (averaging), counted."""
    import torch.distributed as dist

    BUCKETS["n"] += 1
    tensor = bucket.buffer().div_(dist.get_world_size())
    return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])


class Record:
    """A callback writing this rank's JSON at fit end."""

    def __init__(self, out):
        self.out, self.steps = out, []

    def __call__(self):
        import lightning as L

        record = self

        class _Callback(L.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                metrics = trainer.callback_metrics
                record.steps.append({k: float(metrics[k]) for k in ("train/reward_mean", "train/loss") if k in metrics}
                                    | {"prompts": list(batch["prompt"])})

            def on_train_start(self, trainer, module):
                if trainer.world_size > 1 and hasattr(trainer.strategy.model, "register_comm_hook"):
                    # DDP: Lightning registers comm hooks only on CUDA: register it here
                    trainer.strategy.model.register_comm_hook(state=None, hook=counting_allreduce_hook)

            def on_fit_end(self, trainer, module):
                from callbacks import EMA

                whole = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731 (FSDP2 shards)
                params = [whole(p.detach()).double() for p in module.policy.trainable_parameters()]
                ema = [cb for cb in trainer.callbacks if isinstance(cb, EMA)]
                averages = [whole(t).double() for t in ema[0].state_dict()["ema"].values()] if ema else []
                with open(os.path.join(record.out, f"rank{trainer.global_rank}.json"), "w") as f:
                    json.dump({"checksum": float(sum(p.sum() for p in params)),
                               "abs_checksum": float(sum(p.abs().sum() for p in params)),
                               "ema_checksum": float(sum(t.abs().sum() for t in averages)),
                               "strategy": type(trainer.strategy).__name__,
                               "global_step": trainer.global_step, "world_size": trainer.world_size,
                               "buckets": BUCKETS["n"], "backwards": BACKWARDS, "advantages": ADVANTAGES,
                               "steps": record.steps}, f)

        return _Callback()


def main():
    from lightning.pytorch.strategies import DDPStrategy
    from test_cli import tiny_overrides

    import flowrl.cli as cli_module

    out, config, *overrides = sys.argv[1:]
    os.makedirs(out, exist_ok=True)
    prompt_file = os.path.join(out, "prompts.txt")
    if not os.path.exists(prompt_file):
        with open(prompt_file, "w") as f:
            f.write("a red circle\ntwo blue squares\na green triangle\nthree yellow circles\n")
    args = ["--config", config, *tiny_overrides(config, None, prompt_file), "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", *overrides]
    from flowrl.algorithms import update
    from flowrl.algorithms.base import FlowRLModule

    plain_backward = update.backward

    def counted_backward(module, loss, sync):
        before = BUCKETS["n"]
        plain_backward(module, loss, sync)
        BACKWARDS.append((sync, BUCKETS["n"] - before))

    update.backward = counted_backward
    plain_advantages = FlowRLModule.compute_advantages

    def recorded_advantages(self, scores, group_ids, keep=None):
        advantages = plain_advantages(self, scores, group_ids, keep)
        ADVANTAGES.append({"rewards": scores.total.tolist(), "advantages": advantages.tolist()})
        return advantages

    FlowRLModule.compute_advantages = recorded_advantages
    cli = cli_module.main(args, run=False)
    trainer = cli.trainer
    from callbacks import FSDP2Strategy

    assert trainer.world_size == 1 or isinstance(trainer.strategy, (DDPStrategy, FSDP2Strategy))
    trainer.callbacks.append(Record(out)())
    trainer.fit(cli.model, datamodule=cli.datamodule)


if __name__ == "__main__":
    main()
