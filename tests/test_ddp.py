"""Two CPU processes (DDP, gloo) train in step, finish cleanly, and stop together when one of them fails.

Each case runs ``tests/ddp_run.py`` as a script (Lightning's ``ddp`` strategy starts the second process by running
the script again), on the toy GRPO config shrunk to two iterations."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "ddp_run.py")
GRPO = os.path.join(ROOT, "lightning_configs", "toy", "grpo.yaml")
DDP = ["--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu"]


def run(out, *overrides, timeout=240):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    try:
        result = subprocess.run([sys.executable, SCRIPT, str(out), GRPO, *DDP, *overrides], env=env, cwd=out.parent,
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # a hang is the failure this file guards against
        subprocess.run(["pkill", "-9", "-f", str(out)], check=False)
        raise AssertionError(f"the two processes did not finish within {timeout} s (a collective left waiting)") from e
    ranks = [json.load(open(out / f"rank{r}.json")) for r in (0, 1) if (out / f"rank{r}.json").exists()]
    return result, ranks


def test_two_processes_train_in_step_and_finish(tmp_path):
    """Gradient accumulation over two micro-batches and two trained steps: four backward passes an iteration, only
    the last all-reduces (no_sync on the others); both processes end with identical parameters, exit status 0."""
    result, ranks = run(tmp_path / "run", "--model.train_batch_size=2", "--model.gradient_accumulation_steps=2")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Connection closed" not in result.stderr
    assert len(ranks) == 2 and all(r["world_size"] == 2 and r["global_step"] == 2 for r in ranks)
    assert ranks[0]["checksum"] == ranks[1]["checksum"] and ranks[0]["abs_checksum"] == ranks[1]["abs_checksum"]
    for rank in ranks:
        synced = [(sync, buckets) for sync, buckets in rank["backwards"]]
        assert len(synced) == 2 * 4
        assert [sync for sync, _ in synced] == [False, False, False, True] * 2
        assert all(buckets == 0 for sync, buckets in synced if not sync)  # no all-reduce on accumulation steps
        assert all(buckets >= 1 for sync, buckets in synced if sync)
    # the processes train on different groups of the same global batch
    for step0, step1 in zip(ranks[0]["steps"], ranks[1]["steps"]):
        assert not set(step0["prompts"]) & set(step1["prompts"])


@pytest.mark.parametrize("failure, message", [
    ("--model.rewards=[{class_path: ddp_run.FailOnRank1}]", "reward server of rank 1 is down"),
    ("--nan-loss-on-rank1", "non-finite loss nan"),
], ids=["reward-raises", "nan-loss"])
def test_a_failure_on_one_process_stops_both(tmp_path, failure, message):
    result, ranks = run(tmp_path / "run", failure, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr
    assert "[rank0]" in result.stderr and "[rank1]" in result.stderr  # both raised, neither was left waiting
    assert not ranks  # fit ended without reaching its end on either process
