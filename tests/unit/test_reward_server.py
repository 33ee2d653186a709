"""``flowrl serve-reward`` answers every bad request with a 4xx (or 500) JSON error, as a client sees it.

One real server process for the module (127.0.0.1, a bearer token, a 1 MiB body limit, a 1M-pixel limit) hosting
JPEG compressibility behind a reward that raises on the prompt "boom" (and drops a score on "short"). Each bad request goes through
``http.client`` (or a raw socket, where http.client cannot malform it); the last tests check that the server
still scores a good request and that its log holds no traceback.
"""

import base64
import http.client
import io
import json
import socket
import struct
import zlib

import pytest
import torch
from PIL import Image
from test_remote_reward import eight_bit, start_server

from flowrl.cli import console_main
from flowrl.errors import ConfigError
from flowrl.rewards import JpegCompressibility, RewardError, WeightedReward
from flowrl.rewards.remote import TOKEN_ENV, RemoteReward, RewardServerError, payload

TOKEN = "s3cret-Token_42"
LIMIT = 2 ** 20  # --max-request-mb 1
MAX_PIXELS = 1_000_000

BOOM = '''
from flowrl.rewards import JpegCompressibility


class JpegOrBoom(JpegCompressibility):
    def __call__(self, images, prompts):
        if "boom" in prompts:
            raise RuntimeError("cannot score boom")
        if "short" in prompts:
            return super().__call__(images, prompts)[:-1]
        return super().__call__(images, prompts)
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(process, host, port, log path) of the module's server."""
    tmp = tmp_path_factory.mktemp("reward-server")
    (tmp / "boom_reward_pkg.py").write_text(BOOM)
    log = tmp / "server.log"
    proc, url = start_server("--class-path", "boom_reward_pkg.JpegOrBoom", "--max-request-mb", "1",
                             "--max-pixels", str(MAX_PIXELS), env={"PYTHONPATH": str(tmp), TOKEN_ENV: TOKEN}, log=log)
    yield proc, "127.0.0.1", int(url.rsplit(":", 1)[1]), log
    proc.kill()
    proc.wait()


@pytest.fixture()
def token_env(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)


def ask(server, method, path, body=None, headers=None, token=TOKEN):
    """(status, headers, JSON answer) of one request."""
    _, host, port, _ = server
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request(method, path, body=data, headers={**auth, **(headers or {})})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        conn.close()


def raw_request(server, data: bytes):
    """(status, JSON answer) of bytes sent as they are, the sending side then closed."""
    _, host, port, _ = server
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(1 << 16):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def png(image=None, size=(16, 16)):
    buf = io.BytesIO()
    (image or Image.new("RGB", size, (200, 30, 60))).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def png_claiming(width, height):
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb's few bytes)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
    data += chunk(b"IEND", b"")
    return base64.b64encode(data).decode()


def body(prompts=("a",), image=None, **fields):
    return {"prompt": list(prompts), "image": [png()] * len(prompts) if image is None else image, "video": None,
            **fields}


TRUNCATED = base64.b64encode(base64.b64decode(png())[:-30]).decode()

BAD_BODIES = {  # name: (body, status, what the error says)
    "malformed JSON": (b'{"prompt": [', 400, "the body is not JSON"),
    "bytes that are not UTF-8": (b"\xff\xfe\xfa", 400, "the body is not JSON"),
    "JSON nested too deeply": (b"[" * 200_000, 400, "nested too deeply"),
    "empty body": (b"", 400, "the body is empty"),
    "a JSON array": ([1, 2], 400, "must be a JSON object with prompt and image (or video); got a JSON list"),
    "unknown field": ({"prompts": ["a"], "image": [png()]}, 400, "unknown field(s) ['prompts']"),
    "missing prompt": ({"image": [png()]}, 400, "missing field prompt"),
    "prompt a string": ({"prompt": "a", "image": [png()]}, 400, "prompt must be a list of strings; got str"),
    "prompt of numbers": ({"prompt": [1], "image": [png()]}, 400, "got list holding ['int']"),
    "empty batch": (body([], []), 400, "empty batch"),
    "neither image nor video": ({"prompt": ["a"]}, 400, "neither image nor video"),
    "image and video": (body(video=[[png()]]), 400, "both image and video"),
    "image not a list": (body(image=png()), 400, "image must be a list (or null); got str"),
    "fewer images than prompts": (body(["a", "b"], [png()]), 400, "2 prompt(s) but 1 image(s)"),
    "image a number": (body(image=[7]), 400, "image[0] must be a base64 string; got int"),
    "bad base64": (body(image=["not base64 at all!"]), 400, "image[0] is not valid base64"),
    "base64 of something not an image": (body(image=[base64.b64encode(b"GIF89a, or not").decode()]), 400,
                                         "image[0] is not an image PIL can read"),
    "a truncated PNG": (body(image=[TRUNCATED]), 400, "image[0] could not be decoded"),
    "images of two sizes": (body(["a", "b"], [png(), png(size=(8, 16))]), 400,
                            "image[1] is 8x16 but image[0] is 16x16"),
    "videos of unequal length": ({"prompt": ["a", "b"], "video": [[png()] * 2, [png()]]}, 400,
                                 "video[1] has 1 frames but video[0] has 2"),
    "a video without frames": ({"prompt": ["a"], "video": [[]]}, 400, "video[0] must be a non-empty list"),
    "a video frame not an image": ({"prompt": ["a"], "video": [[png(), "aGVsbG8="]]}, 400,
                                   "video[0][1] is not an image"),
    "condition images, one entry short": (body(["a", "b"], condition_images=[[png()]]), 400,
                                          "condition_images must be a list with one entry per prompt (2)"),
    "a condition image in bad base64": (body(condition_images=[["%%%"]]), 400,
                                        "condition_images[0][0] is not valid base64"),
    "condition images not a list": (body(condition_images=[png()]), 400,
                                    "condition_images[0] must be a list of base64 PNGs or null; got str"),
    "condition videos": (body(condition_videos=[[png()]]), 400, "condition_videos is not supported"),
    "a decompression bomb": (body(image=[png_claiming(20_000, 20_000)]), 413, "image[0] is too large to decode"),
    "an image above PIL's limit": (body(image=[png_claiming(10_000, 10_000)]), 413,
                                   "above the limit of 89478485 pixels per image"),
    "more pixels than --max-pixels": (body(["a"] * 5, [png(size=(500, 500))] * 5), 413,
                                      "decodes to 1250000 pixels, above this server's limit of 1000000"),
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_a_bad_body_gets_a_json_error_naming_it(server, name):
    data, status, says = BAD_BODIES[name]
    code, headers, answer = ask(server, "POST", "/compute", data, {"Content-Type": "application/json"})
    assert (code, headers["Content-Type"]) == (status, "application/json")
    assert says in answer["error"], answer


def test_a_reward_that_raises_or_miscounts_is_a_500_naming_its_error(server):
    code, _, answer = ask(server, "POST", "/compute", body(["ok", "boom"], [png(), png()]))
    assert code == 500 and answer == {"error": "the reward raised RuntimeError: cannot score boom"}
    code, _, answer = ask(server, "POST", "/compute", body(["ok", "short"], [png(), png()]))
    assert code == 500 and answer == {"error": "the reward returned 1 scores for 2 samples"}


@pytest.mark.parametrize(("method", "path", "status", "says"), [
    ("GET", "/nowhere", 404, "unknown path /nowhere; use GET /health or POST /compute"),
    ("POST", "/score", 404, "unknown path /score"),
    ("GET", "/compute", 405, "GET /compute is not allowed; use POST /compute"),
    ("PUT", "/compute", 405, "PUT /compute is not allowed"),
    ("DELETE", "/health", 405, "DELETE /health is not allowed; use GET /health"),
    ("BREW", "/compute", 501, "Unsupported method ('BREW')"),
])
def test_a_wrong_path_or_method_gets_a_json_error(server, method, path, status, says):
    code, headers, answer = ask(server, method, path, body(), {"Content-Type": "application/json"})
    assert code == status and says in answer["error"], answer
    if status == 405:
        assert headers["Allow"] == ("POST" if path == "/compute" else "GET")


def send_head(server, headers):
    """Only the head of a POST /compute: the status and answer show that the server decided before any body."""
    _, host, port, _ = server
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.putrequest("POST", "/compute")
        for key, value in {"Authorization": f"Bearer {TOKEN}", **headers}.items():
            conn.putheader(key, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_a_body_above_the_limit_is_refused_from_its_content_length_before_it_is_read(server):
    code, answer = send_head(server, {"Content-Length": str(50 * 2 ** 20)})  # 50 MB announced, none sent
    assert code == 413 and f"the body of {50 * 2 ** 20} bytes exceeds this server's limit of {LIMIT} bytes" \
        in answer["error"] and "batch_size" in answer["error"]
    junk = b"x" * (LIMIT + 1)  # sent in full: the server drains it after answering, so the client reads the 413
    code, _, answer = ask(server, "POST", "/compute", junk)
    assert code == 413 and "--max-request-mb" in answer["error"]


def test_a_post_without_a_usable_content_length_is_refused(server):
    code, answer = send_head(server, {})
    assert code == 411 and "needs a Content-Length" in answer["error"]
    code, answer = send_head(server, {"Transfer-Encoding": "chunked"})
    assert code == 411
    code, answer = send_head(server, {"Content-Length": "lots"})
    assert code == 400 and answer["error"] == "Content-Length must be a non-negative integer; got 'lots'"


def test_a_body_shorter_than_its_content_length_and_a_garbage_request_line_get_answers(server):
    head = f"POST /compute HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100\r\n\r\n".encode()
    code, answer = raw_request(server, head + b'{"prompt":')
    assert code == 400 and answer["error"] == "the body ended after 10 of the 100 bytes of its Content-Length"
    for line, says in ((b"hello", "Bad request syntax ('hello')"), (b"GET /health HTTP/banana", "Bad request version")):
        code, answer = raw_request(server, line + b"\r\n\r\n")
        assert code == 400 and answer["error"].startswith(says)


@pytest.mark.parametrize(("headers", "says"), [
    ({}, "this server wants a bearer token"),
    ({"Authorization": "Bearer not-the-token"}, "wrong bearer token"),
    ({"Authorization": f"Basic {TOKEN}"}, "this server wants a bearer token"),
    ({"Authorization": f"Bearer {TOKEN}x"}, "wrong bearer token"),
])
def test_a_missing_or_wrong_token_is_a_401_on_every_path(server, headers, says):
    for method, path in (("POST", "/compute"), ("GET", "/health"), ("GET", "/nowhere")):
        code, answer_headers, answer = ask(server, method, path, body(), headers, token=None)
        assert code == 401 and says in answer["error"] and answer_headers["WWW-Authenticate"] == "Bearer"
        assert TOKEN not in json.dumps(answer)


def test_remote_reward_sends_the_token_from_the_environment(server, monkeypatch):
    _, host, port, _ = server
    url = f"http://{host}:{port}"
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"wants a bearer token: set {TOKEN_ENV}"):
        RemoteReward(url)
    monkeypatch.setenv(TOKEN_ENV, "wrong")
    with pytest.raises(ConfigError, match=f"refused the bearer token in {TOKEN_ENV}"):
        RemoteReward(url)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    images, prompts = eight_bit(3, 3, 16, 16), ["a", "b", "c"]
    torch.testing.assert_close(RemoteReward(url)(images, prompts), JpegCompressibility()(images, prompts),
                               atol=0, rtol=0)


def test_remote_reward_raises_the_servers_error_once_and_on_reward_error_sees_it(server, token_env):
    _, host, port, log = server
    client = RemoteReward(f"http://{host}:{port}", retries=3, backoff=0.01)
    before = log.read_text().count("the reward raised")
    with pytest.raises(RewardServerError, match="answered 500: the reward raised RuntimeError: cannot score boom") \
            as err:
        client(eight_bit(2, 3, 8, 8), ["ok", "boom"])
    assert err.value.status == 500
    assert log.read_text().count("the reward raised") == before + 1  # a 500 is the reward's failure: not retried
    noise = torch.rand(2, 3, 400, 400, generator=torch.Generator().manual_seed(0))
    assert len(json.dumps(payload(noise, ["a", "b"]))) > LIMIT  # two noise PNGs exceed the 1 MiB limit
    with pytest.raises(RewardServerError, match="answered 413: .*batch_size") as err:
        client(noise, ["a", "b"])
    assert err.value.status == 413
    assert RemoteReward(client.url, batch_size=1)(noise, ["a", "b"]).shape == (2,)  # the fix the error names
    scores = WeightedReward({"remote": client}, {"remote": 1.0}).score(eight_bit(2, 3, 8, 8), ["ok", "boom"])
    assert not scores.valid.any() and "cannot score boom" in scores.errors[0]  # what on_reward_error decides on
    with pytest.raises(RewardError, match="cannot score boom"):
        WeightedReward({"remote": client}, {"remote": 1.0})(eight_bit(2, 3, 8, 8), ["ok", "boom"])


def test_the_server_survived_every_bad_request_and_logged_no_traceback(server, token_env):
    proc, host, port, log = server
    images, prompts = eight_bit(4, 3, 16, 16, seed=3), ["a", "b", "c", "d"]
    code, _, answer = ask(server, "POST", "/compute", payload(images, prompts))
    assert code == 200 and answer["rewards"] == JpegCompressibility()(images, prompts).tolist()
    assert proc.poll() is None
    text = log.read_text()
    assert "Traceback" not in text and "DecompressionBombWarning" not in text
    assert " 413 " in text and " 400 " in text and " 401 " in text  # the refusals were seen, and logged one line each


def test_a_server_beyond_localhost_without_a_token_refuses_to_start(monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_:
        console_main(["serve-reward", "--reward", "jpeg_compressibility", "--host", "0.0.0.0", "--port", "0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: serve-reward on 0.0.0.0 accepts other machines: set FLOWRL_REWARD_TOKEN")
    monkeypatch.setenv(TOKEN_ENV, "two words")
    with pytest.raises(SystemExit):
        console_main(["serve-reward", "--reward", "jpeg_compressibility", "--port", "0"])
    assert "FLOWRL_REWARD_TOKEN must be printable ASCII without spaces" in capsys.readouterr().err


def test_bad_server_options_are_one_error_line(monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    for argv, says in ((["--args", "{graded: true}"], "--args must be a JSON object"),
                       (["--args", "[1]"], "--args must be a JSON object"),
                       (["--max-request-mb", "0"], "serve-reward limits must be positive")):
        with pytest.raises(SystemExit) as exit_:
            console_main(["serve-reward", "--reward", "jpeg_compressibility", "--port", "0", *argv])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith(f"error: {says}") and err.count("\n") == 1


def test_condition_images_travel_and_decode_to_what_was_sent():
    """The client's request carries each sample's condition images; the server decodes them (at their own sizes)
    to what the reward would have seen locally (8-bit values)."""
    import json

    from flowrl.conditions import ConditionImages
    from flowrl.rewards.remote import payload
    from flowrl.rewards.remote_request import parse_compute

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 16, 16), generator=g).float() / 255
    conditions = [ConditionImages.from_tensors(torch.randint(0, 256, (3, 24, 16), generator=g).float() / 255), None]
    request = payload(images, ["a", "b"], conditions)
    prompts, batch, decoded = parse_compute(json.dumps(request).encode(), 10**7)
    assert prompts == ["a", "b"] and torch.equal(batch, images) and decoded[1] is None
    assert torch.equal(decoded[0][0], conditions[0][0])
    assert payload(images, ["a", "b"], [None, None])["condition_images"] is None  # nothing to send
