"""``vlm_judge`` against a fake OpenAI-compatible server (stdlib ``http.server`` in a thread on 127.0.0.1) that
answers with scripted logprobs and texts, errors and slow answers."""

import json
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from flowrl.errors import ConfigError
from flowrl.rewards import RewardError, WeightedReward
from flowrl.rewards.remote import decode_png
from flowrl.rewards.vlm_judge import (
    NUMBER_PATTERN,
    JudgeRequestError,
    VlmJudge,
    parse_number,
    select_frames,
    yes_probability,
)

MODEL = "judge-vl"


class FakeJudge:
    """An OpenAI-compatible server: ``GET /v1/models`` lists ``models``; ``POST /v1/chat/completions`` records the
    request and answers ``script(body, n)`` -> ``(status, dict | bytes, delay_s)`` (``n``: requests before this
    one). Counts the requests in flight at once."""

    def __init__(self, models=(MODEL,), key=None):
        self.models, self.key = list(models), key
        self.script = lambda body, n: (200, logprob_answer([("Yes", 0.9)]), 0.0)
        self.requests: list[tuple[dict, dict]] = []  # (headers, body)
        self.active = self.max_active = 0
        self.lock, self.stop = threading.Lock(), threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status, payload):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

            def _authorised(self):
                if fake.key and self.headers.get("Authorization") != f"Bearer {fake.key}":
                    self._send(401, {"error": {"message": "invalid api key"}})
                    return False
                return True

            def do_GET(self):  # noqa: N802
                if self._authorised():
                    self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in fake.models]})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not self._authorised():
                    return
                with fake.lock:
                    n = len(fake.requests)
                    fake.requests.append((dict(self.headers), body))
                    fake.active += 1
                    fake.max_active = max(fake.max_active, fake.active)
                status, payload, delay = fake.script(body, n)
                fake.stop.wait(delay)
                with fake.lock:
                    fake.active -= 1
                try:
                    self._send(status, payload)
                except OSError:  # the client gave up (timeout)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def fake():
    server = FakeJudge()
    yield server
    server.close()


def logprob_answer(top):
    """A chat completion whose one token has the top-k ``[(token, probability), ...]``."""
    entries = [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in top]
    first = entries[0]
    return {"id": "c", "object": "chat.completion", "model": MODEL, "choices": [{
        "index": 0, "message": {"role": "assistant", "content": first["token"]}, "finish_reason": "length",
        "logprobs": {"content": [{**first, "top_logprobs": entries}]}}]}


def text_answer(text):
    return {"id": "c", "object": "chat.completion", "model": MODEL, "choices": [{
        "index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop", "logprobs": None}]}


def question_of(body):
    return [part["text"] for part in body["messages"][-1]["content"] if part["type"] == "text"][0]


def pictures_of(body):
    return [decode_png(part["image_url"]["url"].removeprefix("data:image/png;base64,"))
            for part in body["messages"][-1]["content"] if part["type"] == "image_url"]


def by_prompt(answers, delays=None):
    """A script answering each request by the prompt its question quotes."""
    def script(body, n):
        prompt = question_of(body).split('"')[1]
        return 200, answers[prompt], (delays or {}).get(prompt, 0.0)
    return script


def eight_bit(*shape, seed=0):
    """Images that PNG carries exactly (multiples of 1/255)."""
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed)).float() / 255


def judge(fake, **kwargs):
    return VlmJudge(base_url=fake.url, backoff=0.01, **kwargs)


def test_logprob_scores_sum_the_yes_variants_against_hand_values(fake):
    fake.script = by_prompt({
        "a": logprob_answer([("Yes", 0.5), (" yes", 0.1), ("No", 0.2), ("Maybe", 0.15)]),
        "b": logprob_answer([("No", 0.9), ("The", 0.05)]),  # yes outside a present top-k: probability 0
        "c": logprob_answer([(" YES", 0.3), ("no", 0.1), (" No", 0.1)]),
    })
    images = eight_bit(3, 3, 8, 8)
    relative = judge(fake)(images, ["a", "b", "c"])
    torch.testing.assert_close(relative, torch.tensor([0.6 / 0.8, 0.0, 0.3 / 0.5]))
    assert relative.dtype == torch.float32
    absolute = judge(fake, relative_to_no=False)(images, ["a", "b", "c"])
    torch.testing.assert_close(absolute, torch.tensor([0.6, 0.0, 0.3]))


def test_number_scores_parse_the_final_score_against_the_range(fake):
    fake.script = by_prompt({
        "a": text_answer("The cat is sharp, the lighting natural.\nFinal Score: 3.5"),
        "b": text_answer("4"),
        "c": text_answer("Good overall. **Final Score:** 4.5/5"),
    })
    images = eight_bit(3, 3, 8, 8)
    normalised = judge(fake, scoring="number", score_range=[1, 5])(images, ["a", "b", "c"])
    torch.testing.assert_close(normalised, torch.tensor([2.5 / 4, 3 / 4, 3.5 / 4]))
    raw = judge(fake, scoring="number", score_range=[1, 5], normalize=False)(images, ["a", "b", "c"])
    torch.testing.assert_close(raw, torch.tensor([3.5, 4.0, 4.5]))
    fake.script = lambda body, n: (200, text_answer("quality: rating=7 of 10"), 0.0)
    custom = judge(fake, scoring="number", score_range=[0, 10], number_pattern=r"rating=(\d+)")
    torch.testing.assert_close(custom(images[:1], ["a"]), torch.tensor([0.7]))


def test_parse_number_and_yes_probability_refuse_what_they_cannot_read():
    assert parse_number("Final Score: 2", NUMBER_PATTERN, 1, 5) == 0.25
    with pytest.raises(ValueError, match="no number"):
        parse_number("I would give it 3 out of 5", NUMBER_PATTERN, 1, 5)  # neither labelled nor a bare number
    with pytest.raises(ValueError, match="outside the range"):
        parse_number("Final Score: 7", NUMBER_PATTERN, 1, 5)
    with pytest.raises(ValueError, match="neither 'Yes' nor 'No'"):
        yes_probability(logprob_answer([("Maybe", 0.9)]))
    assert yes_probability(logprob_answer([("Maybe", 0.9)]), relative_to_no=False) == 0.0


def test_request_carries_the_image_template_model_and_key(fake):
    fake.key = "sk-test"
    images = eight_bit(2, 3, 8, 6)
    score = judge(fake, api_key="sk-test", top_logprobs=5, template='Is "{prompt}" in it? Yes or No.',
                  system_prompt="You judge images.", extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    score(images, ["a red circle", "a cat"])
    assert len(fake.requests) == 2
    for headers, body in fake.requests:
        assert headers["Authorization"] == "Bearer sk-test"
        assert body["model"] == MODEL and body["max_tokens"] == 1 and body["logprobs"] is True
        assert body["top_logprobs"] == 5 and body["temperature"] == 0.0
        assert body["chat_template_kwargs"] == {"enable_thinking": False}
        assert body["messages"][0] == {"role": "system", "content": "You judge images."}
        content = body["messages"][1]["content"]
        assert [p["type"] for p in content] == ["image_url", "text"]  # the image, then the question
        assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    sent = {question_of(b): pictures_of(b)[0] for _, b in fake.requests}
    torch.testing.assert_close(sent['Is "a red circle" in it? Yes or No.'], images[0], atol=0, rtol=0)
    torch.testing.assert_close(sent['Is "a cat" in it? Yes or No.'], images[1], atol=0, rtol=0)


def test_number_request_states_the_range_and_asks_for_text(fake):
    fake.script = lambda body, n: (200, text_answer("Final Score: 5"), 0.0)
    judge(fake, scoring="number", score_range=[1, 10], max_tokens=64)(eight_bit(1, 3, 4, 4), ["a dog"])
    _, body = fake.requests[0]
    assert body["max_tokens"] == 64 and "logprobs" not in body and "top_logprobs" not in body
    assert question_of(body) == ('How well does this image show "a dog"? Rate it from 1 to 10 and end your answer '
                                 'with "Final Score: <number>".')


def test_videos_send_spread_frames_after_the_condition_images(fake):
    frames = torch.arange(7).float().mul(30 / 255).view(1, 7, 1, 1, 1).expand(1, 7, 3, 4, 4)  # frame k = 30k/255
    condition = torch.full((3, 4, 4), 250 / 255)
    scores = judge(fake, video_frames=4)(frames, ["a clip"], condition_images=[[condition]])
    assert scores.shape == (1,)
    sent = pictures_of(fake.requests[0][1])
    assert len(sent) == 5  # the condition image, then frames 0, 2, 4, 6 of 7
    values = [round(float(p.mean()) * 255) for p in sent]
    assert values == [250, 0, 60, 120, 180]
    assert select_frames(frames[0], 10).shape[0] == 7  # never more frames than the video has


def test_environment_gives_url_key_and_the_only_served_model(fake, monkeypatch):
    monkeypatch.setenv("FLOWRL_VLM_BASE_URL", fake.url)
    monkeypatch.setenv("FLOWRL_VLM_API_KEY", "sk-env")
    monkeypatch.delenv("FLOWRL_VLM_MODEL", raising=False)
    reward = VlmJudge()
    assert reward.model == MODEL
    reward(eight_bit(1, 3, 4, 4), ["x"])
    assert fake.requests[-1][0]["Authorization"] == "Bearer sk-env"
    # a personal OpenAI key is never sent to the judge: only FLOWRL_VLM_API_KEY is read
    monkeypatch.delenv("FLOWRL_VLM_API_KEY")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-personal")
    VlmJudge()(eight_bit(1, 3, 4, 4), ["x"])
    assert "Authorization" not in fake.requests[-1][0]


@pytest.mark.parametrize("answer, match", [
    (b"<html>Bad Gateway</html>", "not JSON"),
    ({"id": "c", "object": "chat.completion"}, "no choices"),
    (text_answer("Yes"), "no logprobs"),  # logprobs: null
    ({"choices": [{"message": {"content": "Yes"}, "logprobs": {"content": [{"token": "Yes", "logprob": -0.1}]}}]},
     "no logprobs"),  # top_logprobs missing
    (logprob_answer([("Sure", 0.6), ("Maybe", 0.3)]), "neither 'Yes' nor 'No'"),
])
def test_malformed_answers_raise_and_are_not_retried(fake, answer, match):
    fake.script = lambda body, n: (200, answer, 0.0)
    with pytest.raises(ValueError, match=match) as err:
        judge(fake, retries=3)(eight_bit(1, 3, 4, 4), ["a cat"])
    assert "vlm_judge sample 0 ('a cat')" in str(err.value)
    assert len(fake.requests) == 1


@pytest.mark.parametrize("text, match", [("It looks fine.", "no number"), ("Final Score: 11", "outside the range")])
def test_number_answers_without_a_number_in_range_raise(fake, text, match):
    fake.script = lambda body, n: (200, text_answer(text), 0.0)
    with pytest.raises(ValueError, match=match):
        judge(fake, scoring="number", score_range=[1, 10])(eight_bit(1, 3, 4, 4), ["a cat"])


@pytest.mark.parametrize("status", [503, 429])
def test_a_busy_server_is_retried_then_answers(fake, status):
    fake.script = lambda body, n: (status, {"error": {"message": "busy"}}, 0.0) if n == 0 else \
        (200, logprob_answer([("Yes", 0.8), ("No", 0.2)]), 0.0)
    torch.testing.assert_close(judge(fake, retries=3)(eight_bit(1, 3, 4, 4), ["a"]), torch.tensor([0.8]))
    assert len(fake.requests) == 2


def test_a_refused_request_is_not_retried_and_names_the_servers_message(fake):
    fake.script = lambda body, n: (400, {"error": {"message": "image too large", "type": "BadRequestError"}}, 0.0)
    with pytest.raises(JudgeRequestError, match=r"HTTP 400.*image too large"):
        judge(fake, retries=3)(eight_bit(1, 3, 4, 4), ["a"])
    assert len(fake.requests) == 1


def test_retries_run_out_on_a_failing_server(fake):
    fake.script = lambda body, n: (500, {"error": {"message": "CUDA out of memory"}}, 0.0)
    with pytest.raises(ConnectionError, match=r"after 3 attempts.*HTTP 500: CUDA out of memory"):
        judge(fake, retries=3)(eight_bit(1, 3, 4, 4), ["a"])
    assert len(fake.requests) == 3


def test_a_slow_answer_times_out(fake):
    fake.script = lambda body, n: (200, logprob_answer([("Yes", 0.9)]), 10.0)
    with pytest.raises(ConnectionError, match=r"after 2 attempts \(last: timed out after 0.3 s\)"):
        judge(fake, timeout=0.3, retries=2)(eight_bit(1, 3, 4, 4), ["a"])
    assert len(fake.requests) == 2


def test_concurrency_is_limited_and_the_order_kept(fake):
    prompts = [f"p{i}" for i in range(6)]
    probabilities = [0.1 * (i + 1) for i in range(6)]
    fake.script = by_prompt({p: logprob_answer([("Yes", q), ("No", 1 - q)]) for p, q in zip(prompts, probabilities)},
                            delays={p: 0.3 - 0.05 * i for i, p in enumerate(prompts)})  # later ones finish sooner
    scores = judge(fake, concurrency=2)(eight_bit(6, 3, 4, 4), prompts)
    torch.testing.assert_close(scores, torch.tensor(probabilities))
    assert fake.max_active == 2


def test_construction_refuses_an_unreachable_server_in_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(ConfigError) as err:
        VlmJudge(base_url=url, model=MODEL)
    message = str(err.value)
    assert "\n" not in message and f"{url}/models" in message and "vllm serve" in message
    assert VlmJudge(base_url=url, model=MODEL, check_server=False).model == MODEL  # the check can be skipped


def test_construction_refuses_a_wrong_key_or_model():
    server = FakeJudge(models=["a-model", "b-model"], key="sk-right")
    try:
        with pytest.raises(ConfigError, match="FLOWRL_VLM_API_KEY"):
            VlmJudge(base_url=server.url, api_key="sk-wrong", model="a-model")
        with pytest.raises(ConfigError, match=r"serves \['a-model', 'b-model'\], not 'c-model'"):
            VlmJudge(base_url=server.url, api_key="sk-right", model="c-model")
        with pytest.raises(ConfigError, match="set model to one of them"):
            VlmJudge(base_url=server.url, api_key="sk-right")  # two models served: which one is ambiguous
    finally:
        server.close()


@pytest.mark.parametrize("kwargs, match", [
    ({"template": "Is this a good image?"}, r"no \{prompt\} placeholder; add \{prompt\}"),
    ({"scoring": "number"}, "needs score_range"),
    ({"scoring": "number", "score_range": [5, 1]}, "low < high"),
    ({"scoring": "stars"}, "must be one of logprob, number"),
    ({"concurrency": 0}, "concurrency must be >= 1"),
    ({"number_pattern": "(unclosed"}, "not a regex"),
    ({"model": None}, "needs the model's name"),  # with the server check off, nothing else can name it
])
def test_bad_configuration_is_refused_in_one_line(kwargs, match, monkeypatch):
    monkeypatch.delenv("FLOWRL_VLM_MODEL", raising=False)
    with pytest.raises(ConfigError, match=match) as err:
        VlmJudge(**{"base_url": "http://127.0.0.1:9/v1", "check_server": False, "model": MODEL, **kwargs})
    assert "\n" not in str(err.value)


def test_a_failing_judge_becomes_a_reward_error(fake):
    fake.script = lambda body, n: (200, text_answer("Yes"), 0.0)  # no logprobs
    weighted = WeightedReward.from_specs([{"name": "vlm_judge", "args": {"base_url": fake.url}, "label": "judge"}])
    scores = weighted.score(eight_bit(2, 3, 4, 4), ["a", "b"])
    assert not scores.valid.any() and torch.isnan(scores.terms["judge"]).all()
    assert "reward 'judge' raised ValueError" in scores.errors[0] and "no logprobs" in scores.errors[0]
    with pytest.raises(RewardError, match="on_reward_error"):
        weighted(eight_bit(2, 3, 4, 4), ["a", "b"])
