"""Rewards over HTTP: ``flowrl serve-reward`` hosts any reward, :class:`RemoteReward` calls a server.

The protocol is the one reward servers of the field already speak, so a server written for them works
unchanged with :class:`RemoteReward`, and ``flowrl serve-reward`` serves their clients:

- ``GET /health``: status 200 when the server is up (``{"status": "ok"}``).
- ``POST /compute`` with JSON ``{"prompt": [...], "image": [base64 PNG, ...] | null,
  "video": [[base64 PNG frame, ...], ...] | null, "condition_images": [[base64 PNG, ...] | null, ...] | null,
  "condition_videos": null, "kwargs": null}``; the answer is ``{"rewards": [float, ...]}`` (one per prompt).
  ``condition_images``: each sample's condition images (editing, image-to-video), given to a served reward that
  uses them (``uses_condition_images``) and ignored by one that does not.
- Every other answer is JSON ``{"error": "..."}`` naming the problem: 4xx for a request the server refuses (400
  malformed, 401 a missing or wrong bearer token, 404 / 405 a wrong path or method, 411 no Content-Length, 413
  too large: the body, checked from Content-Length before it is read, or the images it decodes to), 500 when the
  reward itself raised (the server stays up). A 200 ``{"error": ...}``, as some servers answer, is an error too.

Access: when ``FLOWRL_REWARD_TOKEN`` is set, the server requires ``Authorization: Bearer <token>`` on every
request and :class:`RemoteReward` sends it from the same variable; a server bound beyond localhost
(``--host 0.0.0.0``) refuses to start without one.

Standard library only (``http.server``, ``urllib``): a reward server then needs nothing beyond the reward's own
packages, and the client adds no dependency to training.
"""

from __future__ import annotations

import argparse
import base64
import hmac
import io
import ipaddress
import json
import os
import socket
import sys
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch
from PIL import Image

from flowrl.errors import ConfigError
from flowrl.rewards.base import RewardSpec, to_pil
from flowrl.rewards.registry import register_reward
from flowrl.rewards.remote_request import BadRequest, parse_compute

__all__ = ["TOKEN_ENV", "RemoteReward", "RewardServer", "RewardServerError", "decode_png", "encode_png",
           "make_server", "serve_reward_main", "server_healthy"]

TOKEN_ENV = "FLOWRL_REWARD_TOKEN"
DEFAULT_MAX_REQUEST_MB = 64.0
DEFAULT_MAX_PIXELS = 2 ** 28  # ~268M decoded pixels per request: about 3 GB as float32 RGB
RETRIED_STATUS = (502, 503, 504)  # a proxy or a server (re)starting; a 500 is the reward's own failure
ROUTES = {"/health": "GET", "/compute": "POST"}


def encode_png(image: torch.Tensor) -> str:
    """``(C, H, W)`` float in [0, 1] -> base64 PNG (8-bit, what the images would be saved as)."""
    buf = io.BytesIO()
    to_pil(image[None])[0].save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(data: str) -> torch.Tensor:
    """base64 PNG -> ``(3, H, W)`` float32 in [0, 1]."""
    img = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0


def payload(images: torch.Tensor, prompts: Sequence[str], condition_images: Sequence | None = None) -> dict[str, Any]:
    """The ``/compute`` request for a batch of images ``(B, C, H, W)`` or videos ``(B, T, C, H, W)``, with each
    sample's condition images (a sequence of ``(3, H, W)`` tensors, or None) where there are some."""
    is_video = images.ndim == 5
    encoded = [[encode_png(f) for f in x] if is_video else encode_png(x) for x in images]
    conditions = None
    if condition_images is not None and any(c is not None and len(c) for c in condition_images):
        conditions = [None if c is None else [encode_png(im) for im in c] for c in condition_images]
    return {"prompt": list(prompts), "image": None if is_video else encoded, "video": encoded if is_video else None,
            "condition_images": conditions, "condition_videos": None, "kwargs": None}


def token_from_env() -> str | None:
    """``FLOWRL_REWARD_TOKEN`` (``None`` when unset or empty), refused when it cannot travel in a header."""
    token = os.environ.get(TOKEN_ENV) or None
    if token is not None and not (token.isascii() and token.isprintable() and " " not in token):
        raise ConfigError(f"{TOKEN_ENV} must be printable ASCII without spaces; make one with "
                          "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return token


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _health(url: str, timeout: float, token: str | None) -> int | None:
    """The status ``GET url/health`` answers, ``None`` when nothing answers."""
    request = urllib.request.Request(f"{url.rstrip('/')}/health", headers=_auth(token))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as err:
        err.close()
        return err.code
    except OSError:  # refused, reset, timed out (URLError is an OSError)
        return None


def server_healthy(url: str, timeout: float = 5.0, token: str | None = None) -> bool:
    """Whether ``GET url/health`` answers 200 (sending ``token``, by default ``FLOWRL_REWARD_TOKEN``)."""
    return _health(url, timeout, token or token_from_env()) == 200


def _error_text(raw: bytes) -> str:
    """The server's JSON error (``error``, or FastAPI's ``detail``), else the start of its body."""
    try:
        answer = json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")[:500] or "(empty body)"
    if isinstance(answer, dict) and (answer.get("error") or answer.get("detail")):
        return str(answer.get("error") or answer.get("detail"))
    return json.dumps(answer)[:500]


class RewardServerError(RuntimeError):
    """A reward server's refusal or failure: ``status`` (the HTTP status) and the server's error message."""

    def __init__(self, url: str, status: int, message: str):
        super().__init__(f"reward server {url} answered {status}: {message}")
        self.status, self.message = status, message


class RemoteReward:
    """A reward computed by a server (``flowrl serve-reward`` or any server of the same protocol).

    A 4xx or 5xx answer raises :class:`RewardServerError` with the server's JSON error (the run's
    ``on_reward_error`` decides what follows), except 502 / 503 / 504 (a proxy, a server restarting), which are
    retried like a refused connection. The bearer token, when the server wants one, comes from
    ``FLOWRL_REWARD_TOKEN`` and never from the config (configs are logged with the run).

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000``.
        timeout: seconds one request may take.
        retries: attempts per request; a refused connection or a 502 / 503 / 504 answer is retried after
            ``backoff`` * 2**attempt seconds.
        batch_size: samples per request (``None``: the whole batch in one); lower it when the server answers 413.
        check_health: ask ``/health`` when built, so a server that is down, or refuses the token, fails the run
            before any work.
    """

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 3, batch_size: int | None = None,
                 backoff: float = 0.5, check_health: bool = True):
        if retries < 1:
            raise ConfigError(f"RemoteReward retries must be >= 1; got {retries}")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"RemoteReward batch_size must be >= 1 or null; got {batch_size}")
        self.url, self.timeout, self.retries = url.rstrip("/"), float(timeout), int(retries)
        self.batch_size, self.backoff = batch_size, float(backoff)
        self._token = token_from_env()
        if check_health:
            self._check_health()

    def _check_health(self) -> None:
        status = _health(self.url, 5.0, self._token)
        if status == 401:
            what = "refused the bearer token in" if self._token else "wants a bearer token: set"
            raise ConfigError(f"the reward server at {self.url} {what} {TOKEN_ENV}; set it to the server's token")
        if status != 200:
            port = urllib.parse.urlsplit(self.url).port or 8000
            raise ConfigError(f"no reward server answers at {self.url}/health"
                              + (f" (status {status})" if status else "") + "; start one, e.g. "
                              f"`flowrl serve-reward --reward shapes --port {port}`, or fix the reward's url")

    def healthy(self, timeout: float = 5.0) -> bool:
        return _health(self.url, timeout, self._token) == 200

    def _scores(self, raw: bytes, n: int) -> list[float]:
        try:
            answer = json.loads(raw)
        except ValueError:
            raise RewardServerError(self.url, 200, f"the answer is not JSON: {raw[:200]!r}") from None
        if isinstance(answer, dict) and answer.get("error"):  # servers that answer a failed reward with a 200
            raise RewardServerError(self.url, 200, str(answer["error"]))
        scores = answer.get("rewards") if isinstance(answer, dict) else None
        if not isinstance(scores, list) or len(scores) != n:
            raise RewardServerError(self.url, 200, f"expected {{\"rewards\": [{n} numbers]}}; got {_error_text(raw)}")
        try:
            return [float(x) for x in scores]
        except (TypeError, ValueError):
            raise RewardServerError(self.url, 200, f"the rewards are not numbers: {scores[:8]}") from None

    def _post(self, body: bytes, n: int) -> list[float]:
        last: Exception | None = None
        for attempt in range(self.retries):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(f"{self.url}/compute", data=body, method="POST",
                                             headers={"Content-Type": "application/json", **_auth(self._token)})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as r:
                    raw = r.read()
            except urllib.error.HTTPError as err:
                try:
                    detail = _error_text(err.read())
                except OSError as read_err:  # the connection broke while the error was read
                    detail = f"(no readable body: {read_err})"
                error = RewardServerError(self.url, err.code, detail)
                if err.code not in RETRIED_STATUS:
                    raise error from None
                last = error
                continue
            except OSError as err:  # refused, reset, timed out (URLError is an OSError)
                last = err
                continue
            return self._scores(raw, n)
        raise ConnectionError(f"reward server {self.url} did not answer after {self.retries} attempts ({last}); "
                              "is it running? (`flowrl serve-reward ...`)") from last

    #: the samples' condition images travel in the request (``condition_images``) where a batch has some
    uses_condition_images = True

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], condition_images=None) -> torch.Tensor:
        size = self.batch_size or len(prompts)
        scores: list[float] = []
        for i in range(0, len(prompts), size):
            chunk = prompts[i:i + size]
            conditions = None if condition_images is None else condition_images[i:i + size]
            scores += self._post(json.dumps(payload(images[i:i + size], chunk, conditions)).encode(), len(chunk))
        return torch.tensor(scores, dtype=torch.float32)


register_reward("remote")(RemoteReward)


# ----------------------------------------------------------------------------------------------------- the server

def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or "" (every interface)
        return False


def check_exposure(host: str, token: str | None) -> None:
    """A server other machines can reach needs a token: anyone who reaches it could otherwise use the GPU."""
    if token is None and not _loopback(host):
        raise ConfigError(f"serve-reward on {host or 'every interface'} accepts other machines: set {TOKEN_ENV} to a "
                          "secret (clients send the same variable), or serve on --host 127.0.0.1")


def _debug() -> bool:
    return os.environ.get("FLOWRL_DEBUG", "") not in ("", "0")


class RewardHandler(BaseHTTPRequestHandler):
    """One request: answered with JSON whatever it holds; the body is read only after the path, the method, the
    token and the announced size pass."""

    server: RewardServer
    server_version = "flowrl-serve-reward"
    timeout = 120  # seconds a silent client may hold a connection (per read or write, so slow uploads still work)
    linger_s = 5.0  # seconds to drain a body left unread before closing (see _linger)

    def _answer(self, code: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except OSError as err:  # the client left before the answer
            self.close_connection = True
            self.log_message("could not answer %d (%s: %s)", code, type(err).__name__, err)

    def _refuse(self, code: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._answer(code, {"error": message}, headers)
        self._linger()

    def _linger(self) -> None:
        """Read and drop, for at most ``linger_s``, a body the client is still sending. Closing a socket with
        unread data resets the connection, and the client would see the reset instead of the answer."""
        if self._body_read or not ("Content-Length" in self.headers or "Transfer-Encoding" in self.headers):
            return
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + self.linger_s
            while (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                if not self.connection.recv(1 << 16):
                    break
        except OSError:
            pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a bad request line, headers too long, an unknown method) as JSON too."""
        self._body_read = not hasattr(self, "headers")  # a request line or headers unread: nothing to drain
        if self.request_version == "HTTP/0.9":  # http.server's default before the line parses: no status line
            self.request_version = "HTTP/1.0"
        self._refuse(code, message or explain or self.responses.get(code, ("error",))[0])
        self.close_connection = True

    def _authorized(self) -> str | None:
        """``None`` when the request may go on, else why not."""
        if self.server.token is None:
            return None
        scheme, _, given = (self.headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return f"this server wants a bearer token: send `Authorization: Bearer <token>` ({TOKEN_ENV} on the client)"
        if not hmac.compare_digest(given.strip().encode(), self.server.token.encode()):
            return f"wrong bearer token: send the server's {TOKEN_ENV}"
        return None

    def _dispatch(self) -> None:
        self._body_read = False
        try:
            refused = self._authorized()
            if refused:
                return self._refuse(401, refused, {"WWW-Authenticate": "Bearer"})
            path = urllib.parse.urlsplit(self.path).path.rstrip("/") or "/"
            method = ROUTES.get(path)
            if method is None:
                return self._refuse(404, f"unknown path {path}; use GET /health or POST /compute")
            if self.command != method:
                return self._refuse(405, f"{self.command} {path} is not allowed; use {method} {path}",
                                    {"Allow": method})
            if path == "/health":
                return self._answer(200, {"status": "ok"})
            self._compute()
        except Exception as err:  # noqa: BLE001 (a fault of the server itself: still an answer, one log line)
            self.log_message("internal error: %s: %s", type(err).__name__, err)
            if _debug():
                traceback.print_exc()
            self._refuse(500, f"internal error of the reward server: {type(err).__name__}: {err}")

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _dispatch  # noqa: N815

    def _body(self) -> bytes | None:
        """The body, or ``None`` after answering why it cannot be read."""
        length = self.headers.get("Content-Length")
        if length is None or "Transfer-Encoding" in self.headers:
            self._refuse(411, "POST /compute needs a Content-Length header (chunked bodies are not read)")
            return None
        try:
            n = int(length)
            if n < 0:
                raise ValueError(length)
        except ValueError:
            self._refuse(400, f"Content-Length must be a non-negative integer; got {length!r}")
            return None
        limit = self.server.max_request_bytes
        if n > limit:
            self._refuse(413, f"the body of {n} bytes exceeds this server's limit of {limit} bytes "
                              "(--max-request-mb); send fewer samples per request (the remote reward's batch_size)")
            return None
        self._body_read = True
        try:
            body = self.rfile.read(n)
        except OSError as err:  # TimeoutError included: the client stopped sending
            self._answer(408, {"error": f"the body did not arrive ({type(err).__name__}: {err})"})
            self.close_connection = True
            return None
        if len(body) < n:
            self._answer(400, {"error": f"the body ended after {len(body)} of the {n} bytes of its Content-Length"})
            return None
        return body

    def _compute(self) -> None:
        body = self._body()
        if body is None:
            return
        try:
            prompts, images, conditions = parse_compute(body, self.server.max_pixels)
        except BadRequest as err:
            return self._answer(err.status, {"error": str(err)})
        reward = self.server.reward
        extra = {"condition_images": conditions} if getattr(reward, "uses_condition_images", False) else {}
        try:
            with self.server.lock, torch.no_grad():
                scores = torch.as_tensor(reward(images, prompts, **extra)).float().reshape(-1).tolist()
        except Exception as err:  # noqa: BLE001 (the reward's failure goes back to the client; the server stays up)
            self.log_message("the reward raised %s: %s", type(err).__name__, err)
            if _debug():
                traceback.print_exc()
            return self._answer(500, {"error": f"the reward raised {type(err).__name__}: {err}"})
        if len(scores) != len(prompts):
            return self._answer(500, {"error": f"the reward returned {len(scores)} scores for {len(prompts)} samples"})
        self._answer(200, {"rewards": scores})

    def log_message(self, format, *args):  # one line per request on stderr, as http.server does
        sys.stderr.write(f"[serve-reward] {self.address_string()} {format % args}\n")


class RewardServer(ThreadingHTTPServer):
    """An HTTP server of ``reward`` (not started: call ``serve_forever``); one batch is scored at a time (a reward
    model is rarely thread-safe), requests are read and decoded in parallel."""

    daemon_threads = True

    def __init__(self, reward: Callable, host: str, port: int, max_request_bytes: int, max_pixels: int,
                 token: str | None):
        self.reward, self.token = reward, token
        self.max_request_bytes, self.max_pixels = int(max_request_bytes), int(max_pixels)
        self.lock = threading.Lock()
        super().__init__((host, port), RewardHandler)

    def handle_error(self, request, client_address) -> None:
        """One line instead of socketserver's traceback: what reaches here is a connection that broke."""
        err = sys.exc_info()[1]
        sys.stderr.write(f"[serve-reward] {client_address[0]} connection error: {type(err).__name__}: {err}\n")
        if _debug():
            traceback.print_exc()


def check_limits(max_request_bytes: int, max_pixels: int) -> None:
    if max_request_bytes < 1 or max_pixels < 1:
        raise ConfigError(f"serve-reward limits must be positive; got --max-request-mb {max_request_bytes / 2 ** 20:g} "
                          f"and --max-pixels {max_pixels}")


def make_server(reward: Callable, host: str = "127.0.0.1", port: int = 8000, *,
                max_request_bytes: int = int(DEFAULT_MAX_REQUEST_MB * 2 ** 20), max_pixels: int = DEFAULT_MAX_PIXELS,
                token: str | None = None) -> RewardServer:
    """An HTTP server of ``reward`` (not started: call ``serve_forever``); ``token`` required of every request."""
    check_exposure(host, token)
    check_limits(max_request_bytes, max_pixels)
    try:
        return RewardServer(reward, host, port, max_request_bytes, max_pixels, token)
    except OSError as err:
        raise ConfigError(f"serve-reward cannot listen on {host}:{port} ({err.strerror or err}); "
                          "choose another --port (or --host)") from None


def serve_reward_main(argv: Sequence[str] | None = None) -> None:
    """``flowrl serve-reward``: host a reward over HTTP."""
    p = argparse.ArgumentParser(prog="flowrl serve-reward", description="Host a flowrl reward over HTTP "
                                f"(GET /health, POST /compute). Set {TOKEN_ENV} to require a bearer token.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--reward", help="a registered reward name (e.g. shapes, jpeg_compressibility)")
    what.add_argument("--class-path", help="your reward class, e.g. mypkg.MyReward")
    p.add_argument("--args", default="{}", help="constructor arguments as JSON, e.g. '{\"graded\": true}'")
    p.add_argument("--host", default="127.0.0.1", help=f"0.0.0.0 to accept other machines (needs {TOKEN_ENV})")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_MB,
                   help="largest request body in MiB, refused (413) from its Content-Length before it is read")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="most decoded pixels per request, all images and frames together (413 above)")
    args = p.parse_args(argv)
    token, max_request_bytes = token_from_env(), int(args.max_request_mb * 2 ** 20)
    check_exposure(args.host, token)  # before the reward is built: loading a reward model can take minutes
    check_limits(max_request_bytes, args.max_pixels)
    try:
        init = json.loads(args.args)
    except ValueError:
        init = None
    if not isinstance(init, dict):
        raise ConfigError(f"--args must be a JSON object (keys in double quotes), e.g. '{{\"graded\": true}}'; "
                          f"got {args.args!r}")
    spec = {"name": args.reward, "args": init} if args.reward else {"class_path": args.class_path, "init_args": init}
    reward = RewardSpec.from_mapping(spec).build()
    # Each image's size is checked against PIL's limit per request (a 413), so PIL's warning would only repeat it.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    server = make_server(reward, args.host, args.port, max_request_bytes=max_request_bytes,
                         max_pixels=args.max_pixels, token=token)
    print(f"serving {args.reward or args.class_path} on http://{args.host}:{server.server_address[1]}"
          + (" (bearer token required)" if token else ""), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
