"""Exact kill and resume: a run killed with SIGKILL after 2 optimizer steps and resumed from its last checkpoint
(``ckpt_path="last"``, as ``flowrl fit --ckpt_path last``) gives, step for step, the metrics and the final weights
of a run never interrupted: data position, step selection, noise draws, optimizer, EMA and off-policy state."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "resume_run.py")


def start(out, config, *extra):
    return subprocess.Popen([sys.executable, SCRIPT, str(out), config, *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(process, expected_rc=0):
    output, _ = process.communicate(timeout=300)
    assert process.returncode == expected_rc, output[-3000:]


def steps(out):
    return [json.loads(line) for line in open(out / "steps.jsonl")]


@pytest.mark.parametrize("config", ["grpo", "nft"])  # grpo: EMA for validation; nft: EMA + off-policy sampling
def test_killed_and_resumed_run_equals_the_uninterrupted_one(config, tmp_path):
    path = os.path.join(ROOT, "lightning_configs", "toy", f"{config}.yaml")
    whole, killed = start(tmp_path / "whole", path), start(tmp_path / "killed", path, "--kill-after", "2")
    finish(whole)
    finish(killed, expected_rc=-9)  # SIGKILL: nothing ran after the kill
    assert [row["step"] for row in steps(tmp_path / "killed")] == [1, 2]
    assert (tmp_path / "killed" / "checkpoints" / "last.ckpt").is_file()
    finish(start(tmp_path / "killed", path))  # the same command again: resumes from last.ckpt
    reference, resumed = steps(tmp_path / "whole"), steps(tmp_path / "killed")
    assert [row.get("step") for row in resumed] == [1, 2, 3, 4, None]
    assert resumed == reference  # every metric, the prompts of every step, the final live and EMA weights
    assert reference[-1]["ema_checksum"] is not None
