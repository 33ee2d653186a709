"""``flowrl serve-reward`` and :class:`RemoteReward` against a real server process on 127.0.0.1."""

import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from tiny import fit_one_iteration, make_module

from flowrl.algorithms import GRPO
from flowrl.errors import ConfigError
from flowrl.rewards import JpegCompressibility, RewardError
from flowrl.rewards.remote import (
    TOKEN_ENV,
    RemoteReward,
    RewardServerError,
    decode_png,
    encode_png,
    server_healthy,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FAILING = '''
import torch

class FailsOnBoom:
    def __call__(self, images, prompts):
        if "boom" in prompts:
            raise RuntimeError("cannot score boom")
        return torch.ones(len(prompts))
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args, env=None, log=None):
    """A ``flowrl serve-reward`` process on a free port of 127.0.0.1, once it answers ``/health`` (with the token
    of ``env``, if any); its output goes to ``log`` (a path) when given, else to a pipe."""
    port = free_port()
    env = {**os.environ, **(env or {})}
    out = open(log, "wb") if log else subprocess.PIPE  # noqa: SIM115 (the process keeps it)
    proc = subprocess.Popen([sys.executable, "-m", "flowrl.cli", "serve-reward", *args, "--port", str(port)],
                            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while not server_healthy(url, timeout=1.0, token=env.get(TOKEN_ENV)):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            proc.wait()
            output = open(log, "rb").read() if log else proc.stdout.read()
            raise AssertionError(f"server did not start: {output.decode()[-2000:]}")
        time.sleep(0.2)
    return proc, url


@pytest.fixture()
def jpeg_server():
    proc, url = start_server("--reward", "jpeg_compressibility")
    yield proc, url
    proc.kill()
    proc.wait()


def eight_bit(*shape, seed=0):
    """Images that PNG carries exactly (multiples of 1/255)."""
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed)).float() / 255


def test_png_round_trip_is_exact_for_8_bit_images():
    image = eight_bit(3, 9, 7)
    torch.testing.assert_close(decode_png(encode_png(image)), image, atol=0, rtol=0)


def test_remote_scores_equal_local_scores_in_batches(jpeg_server):
    _, url = jpeg_server
    images, prompts = eight_bit(5, 3, 16, 16), ["a", "b", "c", "d", "e"]
    local = JpegCompressibility()(images, prompts)
    torch.testing.assert_close(RemoteReward(url)(images, prompts), local, atol=0, rtol=0)
    torch.testing.assert_close(RemoteReward(url, batch_size=2)(images, prompts), local, atol=0, rtol=0)
    videos = eight_bit(2, 3, 3, 16, 16, seed=1)  # (B, T, C, H, W): sent as "video" frames
    torch.testing.assert_close(RemoteReward(url)(videos, ["a", "b"]), JpegCompressibility()(videos, ["a", "b"]),
                               atol=0, rtol=0)


def test_no_server_fails_when_built_and_names_the_command():
    with pytest.raises(ConfigError, match="flowrl serve-reward"):
        RemoteReward(f"http://127.0.0.1:{free_port()}")


def test_reward_error_on_the_server_reaches_the_client_and_the_server_stays_up(tmp_path):
    (tmp_path / "failing_reward_pkg.py").write_text(FAILING)
    proc, url = start_server("--class-path", "failing_reward_pkg.FailsOnBoom", env={"PYTHONPATH": str(tmp_path)})
    try:
        client = RemoteReward(url, retries=2, backoff=0.01)
        images = eight_bit(2, 3, 8, 8)
        with pytest.raises(RewardServerError, match="answered 500: the reward raised RuntimeError: cannot score boom"):
            client(images, ["ok", "boom"])
        assert client.healthy() and client(images, ["ok", "fine"]).tolist() == [1.0, 1.0]
    finally:
        proc.kill()
        proc.wait()


def test_server_killed_mid_run_stops_training_before_an_update(jpeg_server, tiny_sd3_path, prompt_file):
    proc, url = jpeg_server
    module = make_module(GRPO, tiny_sd3_path, rewards=[
        {"name": "remote", "args": {"url": url, "retries": 2, "backoff": 0.01, "timeout": 10}}])

    def fit():
        return fit_one_iteration(module, prompt_file, max_epochs=1, limit_train_batches=1)

    assert fit().global_step > 0  # the server scores the first iteration
    proc.kill()
    proc.wait()
    before = {n: p.detach().clone() for n, p in module.policy.named_trainable_parameters()}
    with pytest.raises(RewardError, match="did not answer after 2 attempts"):
        fit()
    assert all(torch.equal(p, before[n]) for n, p in module.policy.named_trainable_parameters())



def test_serve_reward_with_an_unknown_reward_is_one_error_line():
    out = subprocess.run([sys.executable, "-m", "flowrl.cli", "serve-reward", "--reward", "no_such_reward"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "error: unknown reward 'no_such_reward'" in out.stderr
    assert "Traceback" not in out.stderr
