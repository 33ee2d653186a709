"""Checkpoints are written atomically: killed in the middle of a save, the previous checkpoint stays readable."""

import os
import signal
import subprocess
import sys
import time

import torch
from tiny import fit_one_iteration, make_module

from flowrl.checkpoint import AtomicCheckpointIO

SAVER = """
import os, sys, time
import torch
from flowrl.checkpoint import AtomicCheckpointIO

path, marker = sys.argv[1:3]
io = AtomicCheckpointIO()
io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
real_fsync = os.fsync

def stall(fd):  # the new checkpoint is half on disk: say so, then wait to be killed
    open(marker, "w").close()
    time.sleep(60)

os.fsync = stall
io.save_checkpoint({"step": 2, "w": torch.zeros(3_000_000)}, path)
"""


def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    path, marker = tmp_path / "last.ckpt", tmp_path / "saving"
    child = subprocess.Popen([sys.executable, "-c", SAVER, str(path), str(marker)])
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert time.time() < deadline and child.poll() is None, "the saving process never reached the save"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["step"] == 1 and torch.equal(checkpoint["w"], torch.ones(1000))
    stray = [p.name for p in tmp_path.iterdir() if p.name.startswith("last.ckpt.tmp-")]
    assert len(stray) == 1  # the interrupted write, beside the intact checkpoint; the next save replaces it


def test_a_completed_save_replaces_and_cleans_up(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, tmp_path / "sub" / "a.ckpt")
    io.save_checkpoint({"step": 2}, tmp_path / "sub" / "a.ckpt")
    assert torch.load(tmp_path / "sub" / "a.ckpt", weights_only=True) == {"step": 2}
    assert os.listdir(tmp_path / "sub") == ["a.ckpt"]


def test_flowrl_modules_save_atomically_and_keep_a_users_checkpoint_io(tiny_sd3_path, prompt_file, tmp_path):
    from flowrl.algorithms import GRPO

    trainer = fit_one_iteration(make_module(GRPO, tiny_sd3_path), prompt_file)
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    assert "state_dict" in torch.load(tmp_path / "x.ckpt", weights_only=True)

    class Mine(AtomicCheckpointIO):
        pass

    trainer = fit_one_iteration(make_module(GRPO, tiny_sd3_path), prompt_file, plugins=[Mine()])
    assert type(trainer.strategy.checkpoint_io) is Mine
