"""Two CPU processes (DDP, gloo) train in step, finish cleanly, and stop together when one of them fails.

Each case runs ``tests/e2e/ddp_run.py`` as a script (Lightning's ``ddp`` strategy starts the second process by running
the script again), on the toy GRPO config shrunk to two iterations."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "e2e", "ddp_run.py")
GRPO = os.path.join(ROOT, "lightning_configs", "toy", "grpo.yaml")
DDP = ["--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu"]


def launch(out, *overrides, processes=2, config=GRPO, strategy=DDP):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "e2e")]),
           "OMP_NUM_THREADS": "1"}  # one thread per process: the runs of this file go at once on two cores
    out.mkdir(parents=True)
    strategy = strategy if processes == 2 else ["--trainer.devices=1", "--trainer.accelerator=cpu"]
    root = f"--trainer.default_root_dir={out / 'root'}"  # each run its own checkpoints
    return subprocess.Popen([sys.executable, SCRIPT, str(out), config, *strategy, root, *overrides], env=env,
                            cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait(process, out, timeout=240):
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:  # a hang is the failure this file guards against
        process.kill()
        subprocess.run(["pkill", "-9", "-f", str(out)], check=False)
        raise AssertionError(f"the two processes did not finish within {timeout} s (a collective left waiting)") from e
    ranks = [json.load(open(out / f"rank{r}.json")) for r in (0, 1) if (out / f"rank{r}.json").exists()]
    return process.returncode, stderr, ranks


def world_size_runs(tmp_path, config=GRPO, strategy=DDP, *overrides):
    return {"one": launch(tmp_path / "one", "--data.batch_size=8", "--model.train_batch_size=2",
                          "--model.gradient_accumulation_steps=4", *overrides, processes=1, config=config),
            "ok": launch(tmp_path / "ok", "--data.batch_size=4", "--model.train_batch_size=2",
                         "--model.gradient_accumulation_steps=2", *overrides, config=config, strategy=strategy)}


def check_world_size_invariance(runs, tmp_path):
    """The run of one process and the run of two on the same global batch: the same samples, rewards and
    advantages every iteration, the same weights (and EMA average) after two optimizer steps."""
    import torch

    rc1, err1, (single,) = wait(runs["one"], tmp_path / "one")
    _, _, ranks = wait(runs["ok"], tmp_path / "ok")
    assert rc1 == 0, err1[-4000:]
    for it in range(2):
        assert single["steps"][it]["prompts"] == ranks[0]["steps"][it]["prompts"] + ranks[1]["steps"][it]["prompts"]
        both = {k: ranks[0]["advantages"][it][k] + ranks[1]["advantages"][it][k] for k in ("rewards", "advantages")}
        assert single["advantages"][it]["rewards"] == both["rewards"]  # the same images: the same verifier scores
        torch.testing.assert_close(torch.tensor(single["advantages"][it]["advantages"]),
                                   torch.tensor(both["advantages"]))
    assert any(abs(a) > 0.1 for a in both["advantages"])  # something to learn from
    assert single["checksum"] == pytest.approx(ranks[0]["checksum"], rel=1e-8, abs=1e-6)
    assert single["abs_checksum"] == pytest.approx(ranks[0]["abs_checksum"], rel=1e-8)
    assert single["ema_checksum"] == pytest.approx(ranks[0]["ema_checksum"], rel=1e-8)
    return single, ranks


def test_two_processes_give_the_run_of_one_and_stop_together(tmp_path):
    """Three runs at once. Two processes, 4 samples each (two micro-batches of 2, two trained steps: four backward
    passes an iteration, only the last all-reduces, no_sync on the others): identical parameters on both, exit
    status 0, and the run of one process on the same global batch of 8 (four micro-batches accumulated): the same
    samples, rewards and group advantages every iteration, the same weights after two optimizer steps. Third run:
    the reward raises on rank 1 only; both processes stop, no update."""
    runs = {"failing": launch(tmp_path / "failing", "--model.rewards=[{class_path: ddp_run.FailOnRank1}]"),
            **world_size_runs(tmp_path)}
    returncode, stderr, ranks = wait(runs["ok"], tmp_path / "ok")
    failed_rc, failed_err, failed_ranks = wait(runs["failing"], tmp_path / "failing", timeout=120)
    check_world_size_invariance(runs, tmp_path)

    assert returncode == 0, stderr[-4000:]
    assert "Connection closed" not in stderr
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

    assert failed_rc != 0
    assert "reward server of rank 1 is down" in failed_err and "the reward failed on another process" in failed_err
    assert "[rank0]" in failed_err and "[rank1]" in failed_err  # both raised, neither was left waiting
    assert not failed_ranks  # fit ended without reaching its end on either process


class _TwoProcesses:
    """What ``StepGuard.check_loss`` / ``optimizer_step`` ask of the trainer, for a process of a 2-process run whose
    other process reports ``other_bad``."""

    world_size = 2

    def __init__(self, other_bad):
        self.strategy = self
        self.other_bad = other_bad

    def reduce_boolean_decision(self, decision, all=True):
        return bool(decision) or self.other_bad


@pytest.mark.parametrize("here, there", [(True, False), (False, True)], ids=["nan-here", "nan-on-the-other"])
def test_a_non_finite_loss_on_either_process_stops_both_at_the_optimizer_step(tiny_sd3_path, here, there):
    """With several processes a NaN loss is noted, the backward still runs (the other process waits in its
    all-reduce), and the decision to stop is taken together at the optimizer step, before any update."""
    import torch
    from tiny import make_module

    from flowrl.algorithms import GRPO
    from flowrl.algorithms.update import StepGuard

    module = make_module(GRPO, tiny_sd3_path)
    module._trainer = _TwoProcesses(other_bad=there)
    guard = StepGuard(module)
    guard.check_loss(torch.tensor(float("nan") if here else 1.0))  # no raise: the backward must still run
    optimizer = torch.optim.SGD(list(module.policy.trainable_parameters()), lr=1.0)
    for p in module.policy.trainable_parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in module.policy.trainable_parameters()]
    with pytest.raises(FloatingPointError, match="non-finite loss nan" if here else "on another process"):
        guard.optimizer_step(optimizer, None, {})
    assert all(torch.equal(a, b) for a, b in zip(before, module.policy.trainable_parameters()))  # no update
