"""Rewards over HTTP: ``flowrl serve-reward`` hosts any reward, :class:`RemoteReward` calls a server.

The protocol is the one reward servers of the field already speak, so a server written for them works
unchanged with :class:`RemoteReward`, and ``flowrl serve-reward`` serves their clients:

- ``GET /health``: status 200 when the server is up (``{"status": "ok"}``).
- ``POST /compute`` with JSON ``{"prompt": [...], "image": [base64 PNG, ...] | null,
  "video": [[base64 PNG frame, ...], ...] | null, "condition_images": null, "condition_videos": null,
  "kwargs": null}``; the answer is ``{"rewards": [float, ...]}`` (one per prompt) or ``{"error": "..."}``
  (status 200: the request arrived, the reward failed; a 4xx is a malformed request, a 5xx a server in trouble).

Standard library only (``http.server``, ``urllib``): a reward server then needs nothing beyond the reward's own
packages, and the client adds no dependency to training.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch
from PIL import Image

from flowrl.errors import ConfigError
from flowrl.rewards.base import RewardSpec, to_pil
from flowrl.rewards.registry import register_reward

__all__ = ["RemoteReward", "decode_png", "encode_png", "make_server", "serve_reward_main", "server_healthy"]


def encode_png(image: torch.Tensor) -> str:
    """``(C, H, W)`` float in [0, 1] -> base64 PNG (8-bit, what the images would be saved as)."""
    buf = io.BytesIO()
    to_pil(image[None])[0].save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(data: str) -> torch.Tensor:
    """base64 PNG -> ``(3, H, W)`` float32 in [0, 1]."""
    img = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0


def payload(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, Any]:
    """The ``/compute`` request for a batch of images ``(B, C, H, W)`` or videos ``(B, T, C, H, W)``."""
    is_video = images.ndim == 5
    encoded = [[encode_png(f) for f in x] if is_video else encode_png(x) for x in images]
    return {"prompt": list(prompts), "image": None if is_video else encoded, "video": encoded if is_video else None,
            "condition_images": None, "condition_videos": None, "kwargs": None}


def server_healthy(url: str, timeout: float = 5.0) -> bool:
    """Whether ``GET url/health`` answers 200."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:  # refused, reset, timed out (URLError and HTTPError are OSErrors)
        return False


class RemoteReward:
    """A reward computed by a server (``flowrl serve-reward`` or any server of the same protocol).

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000``.
        timeout: seconds one request may take.
        retries: attempts per request; a refused connection or a 5xx answer is retried after ``backoff`` *
            2**attempt seconds, a 4xx or an ``error`` answer is not (it would fail again).
        batch_size: samples per request (``None``: the whole batch in one).
        check_health: ask ``/health`` when built, so a server that is down fails the run before any work.
    """

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 3, batch_size: int | None = None,
                 backoff: float = 0.5, check_health: bool = True):
        if retries < 1:
            raise ConfigError(f"RemoteReward retries must be >= 1; got {retries}")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"RemoteReward batch_size must be >= 1 or null; got {batch_size}")
        self.url, self.timeout, self.retries = url.rstrip("/"), float(timeout), int(retries)
        self.batch_size, self.backoff = batch_size, float(backoff)
        if check_health and not self.healthy():
            port = urllib.parse.urlsplit(self.url).port or 8000
            raise ConfigError(f"no reward server answers at {self.url}/health; start one, e.g. "
                              f"`flowrl serve-reward --reward shapes --port {port}`, or fix the reward's url")

    def healthy(self, timeout: float = 5.0) -> bool:
        return server_healthy(self.url, timeout)

    def _post(self, body: bytes) -> list[float]:
        last: Exception | None = None
        for attempt in range(self.retries):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(f"{self.url}/compute", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as r:
                    answer = json.loads(r.read())
            except urllib.error.HTTPError as err:
                detail = err.read().decode(errors="replace")[:500]
                if err.code < 500:
                    raise RuntimeError(f"reward server {self.url} refused the request ({err.code}): {detail}") from err
                last = RuntimeError(f"reward server {self.url} failed ({err.code}): {detail}")
                continue
            except (OSError, urllib.error.URLError) as err:  # refused, reset, timed out
                last = err
                continue
            if answer.get("error"):
                raise RuntimeError(f"reward server {self.url}: {answer['error']}")
            return [float(x) for x in answer["rewards"]]
        raise ConnectionError(f"reward server {self.url} did not answer after {self.retries} attempts ({last}); "
                              "is it running? (`flowrl serve-reward ...`)") from last

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        size = self.batch_size or len(prompts)
        scores: list[float] = []
        for i in range(0, len(prompts), size):
            body = json.dumps(payload(images[i:i + size], prompts[i:i + size])).encode()
            scores += self._post(body)
        return torch.tensor(scores, dtype=torch.float32)


register_reward("remote")(RemoteReward)


def _batch(request: dict[str, Any]) -> torch.Tensor:
    if request.get("video"):
        return torch.stack([torch.stack([decode_png(f) for f in frames]) for frames in request["video"]])
    if request.get("image"):
        return torch.stack([decode_png(x) for x in request["image"]])
    raise ValueError("the request has neither image nor video")


def make_server(reward: Callable, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server of ``reward`` (not started: call ``serve_forever``). Requests are scored one at a time."""
    lock = threading.Lock()  # a reward model is rarely thread-safe; one batch at a time

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if self.path.rstrip("/") == "/health":
                self._answer(200, {"status": "ok"})
            else:
                self._answer(404, {"error": f"unknown path {self.path}; use GET /health or POST /compute"})

        def do_POST(self):  # noqa: N802
            if self.path.rstrip("/") != "/compute":
                return self._answer(404, {"error": f"unknown path {self.path}; use POST /compute"})
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                prompts = list(request["prompt"])
                images = _batch(request)
            except (ValueError, KeyError, TypeError) as err:
                return self._answer(400, {"error": f"bad request: {err}"})
            try:
                with lock, torch.no_grad():
                    scores = torch.as_tensor(reward(images, prompts)).float().reshape(-1).tolist()
            except Exception as err:  # the reward's failure goes back to the client in the protocol's error field
                return self._answer(200, {"error": f"{type(err).__name__}: {err}"})
            self._answer(200, {"rewards": scores})

        def log_message(self, format, *args):  # one line per request on stderr, as http.server does
            sys.stderr.write(f"[serve-reward] {self.address_string()} {format % args}\n")

    return ThreadingHTTPServer((host, port), Handler)


def serve_reward_main(argv: Sequence[str] | None = None) -> None:
    """``flowrl serve-reward``: host a reward over HTTP."""
    p = argparse.ArgumentParser(prog="flowrl serve-reward", description="Host a flowrl reward over HTTP "
                                "(GET /health, POST /compute).")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--reward", help="a registered reward name (e.g. shapes, jpeg_compressibility)")
    what.add_argument("--class-path", help="your reward class, e.g. mypkg.MyReward")
    p.add_argument("--args", default="{}", help="constructor arguments as JSON, e.g. '{\"graded\": true}'")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)
    spec = {"name": args.reward, "args": json.loads(args.args)} if args.reward else \
        {"class_path": args.class_path, "init_args": json.loads(args.args)}
    reward = RewardSpec.from_mapping(spec).build()
    server = make_server(reward, args.host, args.port)
    print(f"serving {args.reward or args.class_path} on http://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
