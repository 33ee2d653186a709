"""Exact kill and resume: a run killed with SIGKILL after 1 of its 3 optimizer steps and resumed from its last checkpoint
(``ckpt_path="last"``, as ``flowrl fit --ckpt_path last``) gives, step for step, the metrics and the final weights
of a run never interrupted: data position, step selection, noise draws, optimizer, EMA and off-policy state."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "e2e", "resume_run.py")


def start(out, config, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1",  # two runs at once on two cores
           "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "e2e")])}
    return subprocess.Popen([sys.executable, SCRIPT, str(out), config, *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def finish(process, expected_rc=0):
    output, _ = process.communicate(timeout=300)
    assert process.returncode == expected_rc, output[-3000:]


def steps(out):
    return [json.loads(line) for line in open(out / "steps.jsonl")]


def test_killed_and_resumed_runs_equal_the_uninterrupted_ones(tmp_path):
    """grpo (EMA for validation, SDE step selection) and nft (EMA + off-policy sampling), all runs at once."""
    configs = {name: os.path.join(ROOT, "lightning_configs", "toy", f"{name}.yaml") for name in ("grpo", "nft")}
    started = {(name, kind): start(tmp_path / name / kind, path, *(["--kill-after", "1"] if kind == "killed" else []))
               for name, path in configs.items() for kind in ("whole", "killed")}
    for (_, kind), process in started.items():
        finish(process, expected_rc=-9 if kind == "killed" else 0)  # SIGKILL: nothing ran after the kill
    for name in configs:
        assert [row["step"] for row in steps(tmp_path / name / "killed")] == [1]
        assert (tmp_path / name / "killed" / "checkpoints" / "last.ckpt").is_file()
    resumes = [start(tmp_path / name / "killed", path) for name, path in configs.items()]  # the same command again
    for process in resumes:
        finish(process)
    for name in configs:
        reference, resumed = steps(tmp_path / name / "whole"), steps(tmp_path / name / "killed")
        assert [row.get("step") for row in resumed] == [1, 2, 3, None]
        assert resumed == reference, name  # every metric, the prompts of every step, the final live and EMA weights
        assert reference[-1]["ema_checksum"] is not None


def test_a_killed_fsdp2_run_resumes_from_its_sharded_checkpoint_exactly(tmp_path):
    """nft with EMA, off-policy sampling and a full-copy KL reference on two FSDP2 processes: both processes killed
    after step 1, the same command again resumes from the sharded ``last.ckpt`` (a folder of each process's
    shards, the callbacks' shards included) and gives the uninterrupted run's metrics and weights."""
    config = os.path.join(ROOT, "lightning_configs", "toy", "nft.yaml")
    fsdp2 = ["--config", os.path.join(ROOT, "lightning_configs", "strategies", "fsdp2_toy.yaml"), "--trainer.devices=2",
             "--data.batch_size=2", "--model.train_batch_size=2", "--trainer.max_steps=2"]
    runs = {kind: start(tmp_path / kind, config, *fsdp2, *(["--kill-after", "1"] if kind == "killed" else []))
            for kind in ("whole", "killed")}
    for kind, process in runs.items():
        finish(process, expected_rc=-9 if kind == "killed" else 0)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and {"meta.pt", ".metadata", "__0_0.distcp", "__1_0.distcp"} <= {p.name for p in last.iterdir()}
    finish(start(tmp_path / "killed", config, *fsdp2))
    reference, resumed = steps(tmp_path / "whole"), steps(tmp_path / "killed")
    assert [row.get("step") for row in resumed] == [1, 2, None]
    assert resumed == reference
    assert reference[-1]["ema_checksum"] is not None


def test_a_kill_during_a_sharded_save_keeps_the_previous_checkpoint(tmp_path):
    """FSDP2 (one process, the sharded path: DTensors, distributed checkpoint): killed while writing step 2's shards,
    the run keeps step 1's ``last.ckpt`` whole (the new one was being written beside it), refused by nothing, and
    the same command resumes from it."""
    from flowrl.checkpoint import check_checkpoint_files

    config = os.path.join(ROOT, "lightning_configs", "toy", "nft.yaml")
    fsdp2 = ["--config", os.path.join(ROOT, "lightning_configs", "strategies", "fsdp2_toy.yaml"), "--trainer.devices=1"]
    finish(start(tmp_path, config, *fsdp2, "--kill-during-save", "2"), expected_rc=-9)
    last = tmp_path / "checkpoints" / "last.ckpt"
    check_checkpoint_files(last)
    import torch

    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == 1
    assert (tmp_path / "checkpoints" / "last.ckpt.saving").is_dir()  # the interrupted save, left aside
    finish(start(tmp_path, config, *fsdp2))
    assert [row.get("step") for row in steps(tmp_path)] == [1, 2, 2, 3, None]  # step 2 ran again after the resume
