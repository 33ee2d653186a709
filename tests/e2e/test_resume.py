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
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two runs at once on two cores
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
