"""A short ``flowrl fit`` of a toy config that records every optimizer step's metrics and can kill itself with
SIGKILL after a given step, for tests/e2e/test_resume.py (run as a script so that the kill takes the whole process).

    python tests/e2e/resume_run.py OUT CONFIG [--kill-after K] [flowrl fit overrides ...]

Appends one JSON line per optimizer step to ``OUT/steps.jsonl``; checkpoints (every step, ``last.ckpt``) go to
``OUT/checkpoints``.
"""

import json
import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # test_cli (its tiny_overrides)
sys.path.insert(0, os.path.dirname(HERE))  # tests/: tiny, conftest
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository

KEYS = ("train/reward_mean", "train/loss", "train/ratio_mean", "train/grad_norm", "train/iteration")


def main():
    import lightning as L
    from test_cli import tiny_overrides

    from flowrl.cli import main as flowrl_main

    out, config, *rest = sys.argv[1:]
    kill_after = kill_during_save = None
    if "--kill-after" in rest:
        i = rest.index("--kill-after")
        kill_after = int(rest[i + 1])
        del rest[i:i + 2]
    if "--kill-during-save" in rest:  # SIGKILL once step K's last.ckpt shards are written, before its index
        i = rest.index("--kill-during-save")
        kill_during_save = int(rest[i + 1])
        del rest[i:i + 2]
        import lightning.fabric.strategies.model_parallel as model_parallel

        real_save = model_parallel._distributed_checkpoint_save

        def save_then_die(state, path):
            real_save(state, path)
            if path.name.startswith("last.ckpt") and kill_during_save_step[0] == kill_during_save:
                os.kill(os.getpid(), signal.SIGKILL)

        model_parallel._distributed_checkpoint_save = save_then_die
    kill_during_save_step = [None]
    os.makedirs(out, exist_ok=True)
    prompts = os.path.join(out, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("a red circle\ntwo blue squares\na green triangle\nthree yellow circles\na purple square\n"
                "a red circle left of a blue square\n")

    whole = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731 (FSDP2 shards)

    class Record(L.Callback):  # process 0 writes (every process takes part in gathering the shards)
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            kill_during_save_step[0] = trainer.global_step
            if not trainer.is_global_zero:
                return
            metrics = trainer.callback_metrics
            row = {k: float(metrics[k]) for k in KEYS if k in metrics}
            row.update(step=trainer.global_step, prompts=list(batch["prompt"]))
            with open(os.path.join(out, "steps.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

        def on_train_end(self, trainer, module):
            params = [whole(p.detach()).double() for p in module.policy.trainable_parameters()]
            ema = [c for c in trainer.callbacks if type(c).__name__ == "EMA"]
            row = {"final_checksum": float(sum(p.sum() for p in params)),
                   "ema_checksum": float(sum(whole(t).double().sum() for t in ema[0].state_dict()["ema"].values()))
                   if ema and ema[0].state_dict().get("ema") else None}
            if not trainer.is_global_zero:
                return
            with open(os.path.join(out, "steps.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

    class KillAfter(L.Callback):
        """SIGKILL as the iteration after optimizer step ``kill_after`` starts: that step's checkpoint is on disk."""

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

    args = ["--config", config, *tiny_overrides(config, None, prompts), "--trainer.max_steps=3",
            "--trainer.limit_val_batches=0", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            "--data.batch_size=4", "--model.train_batch_size=4", *rest]
    cli = flowrl_main(args, run=False)
    trainer = cli.trainer
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, L.pytorch.callbacks.ModelCheckpoint)]
    trainer.callbacks += [Record(), L.pytorch.callbacks.ModelCheckpoint(dirpath=os.path.join(out, "checkpoints"),
                                                                        every_n_train_steps=1, save_last=True)]
    if kill_after is not None:
        trainer.callbacks.append(KillAfter())
    resume = os.path.exists(os.path.join(out, "checkpoints", "last.ckpt"))
    trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path="last" if resume else None)


if __name__ == "__main__":
    main()
