"""A vision-language model as the judge: ``vlm_judge`` asks an OpenAI-compatible server (vLLM, SGLang, a hosted
API) a question about each sample and turns the answer into a score.

Each sample is one ``POST {base_url}/chat/completions`` whose user message holds the condition images (edits),
then the generated image (a video: ``video_frames`` frames spread from the first to the last), each a base64 PNG
data URL, then the question: ``template`` with ``{prompt}`` replaced by the sample's prompt. Two scorings:

- ``logprob`` (Flow-Factory's ``vllm_evaluate``): one token is generated with ``logprobs`` and ``top_logprobs: k``;
  ``P(yes)`` sums ``exp(logprob)`` over the top-k tokens that read ``yes_token`` once stripped and lower-cased
  (``Yes``, `` yes``, ``YES``, ...), ``P(no)`` likewise; the score is ``P(yes) / (P(yes) + P(no))``
  (``relative_to_no``, the default, as ``vllm_evaluate``) or ``P(yes)``. A yes-token outside the top-k counts 0;
  an answer without top-k logprobs, or with neither yes nor no among them, raises.
- ``number`` (UnifiedReward style): the answer's number (``Final Score: 3.5``, or an answer that is only a
  number; ``number_pattern`` for another form), checked against ``score_range: [low, high]`` and mapped to
  [0, 1] (``normalize``, the default) or kept raw. No number, or one outside the range, raises.

A malformed answer, a missing logprob or a refused request raises, so that ``WeightedReward`` reports a
``RewardError`` and ``model.on_reward_error`` decides; a judge never gives a silent zero.

Settings from the environment when not in the config: ``FLOWRL_VLM_BASE_URL`` (default
``http://127.0.0.1:8000/v1``, vLLM's), ``FLOWRL_VLM_MODEL`` (default: the server's only model) and
``FLOWRL_VLM_API_KEY`` (default: none, no ``Authorization`` header). ``OPENAI_API_KEY`` is deliberately not
read: a personal OpenAI key must not travel to a local or shared judge server by accident (set
``FLOWRL_VLM_API_KEY=$OPENAI_API_KEY`` to use it). Prefer the environment for the key: configs are saved with
the run.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from flowrl.errors import ConfigError
from flowrl.rewards.registry import register_reward
from flowrl.rewards.remote import encode_png

__all__ = ["VlmJudge", "parse_number", "post_json", "select_frames", "yes_probability"]

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
YES_NO_TEMPLATE = 'Does this image show "{prompt}"? Answer Yes or No.'
NUMBER_TEMPLATE = ('How well does this image show "{prompt}"? Rate it from {low} to {high} and end your answer '
                   'with "Final Score: <number>".')
#: a number after "Final Score" (bold or not), else an answer that is nothing but a number
NUMBER_PATTERN = r"(?i)final\s*score\s*[:=：]?\s*\**\s*([-+]?\d+(?:\.\d+)?)|^\s*([-+]?\d+(?:\.\d+)?)\s*\.?\s*$"
SCORINGS = ("logprob", "number")
MAX_RETRY_AFTER = 60.0  # seconds: a server's Retry-After is honoured up to this


class JudgeRequestError(RuntimeError):
    """The server refused the request (a 4xx other than 429): retrying would fail again."""


def post_json(url: str, body: dict, headers: dict[str, str], timeout: float, retries: int,
              backoff: float) -> dict:
    """POST ``body`` as JSON and return the JSON object answered.

    A refused or reset connection, a timeout, a 5xx or a 429 is retried up to ``retries`` attempts in all, after
    ``backoff * 2**(attempt - 1)`` seconds (or the 429's ``Retry-After``, if longer); any other 4xx raises
    :class:`JudgeRequestError` at once with the server's message; an answer that is not a JSON object raises
    ``ValueError`` (not retried: a server that answers garbage will again).
    """
    data = json.dumps(body).encode()
    last, retry_after = "", 0.0
    for attempt in range(retries):
        if attempt:
            time.sleep(max(backoff * 2 ** (attempt - 1), retry_after))
        retry_after = 0.0
        request = urllib.request.Request(url, data=data, method="POST",
                                         headers={"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as err:
            detail = _error_detail(err)
            if err.code == 429 or err.code >= 500:
                last = f"HTTP {err.code}: {detail}"
                retry_after = _retry_after(err.headers.get("Retry-After"))
                continue
            raise JudgeRequestError(f"{url} refused the request (HTTP {err.code}): {detail}") from err
        except (OSError, http.client.HTTPException) as err:  # refused, reset, timed out, cut short
            timed_out = isinstance(err, TimeoutError) or isinstance(getattr(err, "reason", None), TimeoutError)
            last = f"timed out after {timeout:g} s" if timed_out else f"{type(err).__name__}: {err}"
            continue
        try:
            answer = json.loads(raw)
        except ValueError as err:
            raise ValueError(f"{url} answered something that is not JSON: {raw[:200]!r}") from err
        if not isinstance(answer, dict):
            raise ValueError(f"{url} answered JSON that is not an object: {raw[:200]!r}")
        return answer
    raise ConnectionError(f"{url} did not answer after {retries} attempts (last: {last})")


def _error_detail(err: urllib.error.HTTPError) -> str:
    """The message of an OpenAI-style error answer (``{"error": {"message": ...}}``), else its text."""
    text = err.read().decode(errors="replace")[:500]
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return text
    return str(error.get("message", error) if isinstance(error, dict) else error or text)


def _retry_after(value: str | None) -> float:
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER) if value else 0.0
    except ValueError:  # an HTTP date: fall back to the backoff
        return 0.0


def select_frames(video: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` frames of ``(T, C, H, W)`` evenly spread from the first to the last (all of them if fewer)."""
    t = video.shape[0]
    index = torch.linspace(0, t - 1, min(count, t)).round().long().unique()
    return video[index]


def _choice(answer: dict) -> dict:
    try:
        choice = answer["choices"][0]
    except (KeyError, IndexError, TypeError) as err:
        raise ValueError(f"malformed answer, no choices[0]: {json.dumps(answer)[:300]}") from err
    if not isinstance(choice, dict):
        raise ValueError(f"malformed answer, choices[0] is not an object: {json.dumps(answer)[:300]}")
    return choice


def _top_logprobs(answer: dict) -> list[tuple[str, float]]:
    """``(token, logprob)`` of the first generated token's top-k; raises when the answer has none."""
    logprobs = _choice(answer).get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    top = content[0].get("top_logprobs") if isinstance(content, list) and content and isinstance(content[0], dict) \
        else None
    if not isinstance(top, list) or not top:
        raise ValueError("the answer has no logprobs.content[0].top_logprobs (does the server return logprobs? "
                         f"otherwise use scoring: number): {json.dumps(answer)[:300]}")
    pairs = []
    for entry in top:
        token = entry.get("token") if isinstance(entry, dict) else None
        logprob = entry.get("logprob") if isinstance(entry, dict) else None
        if not isinstance(token, str) or isinstance(logprob, bool) or not isinstance(logprob, (int, float)) \
                or math.isnan(logprob):
            raise ValueError(f"malformed top_logprobs entry {entry!r}")
        pairs.append((token, float(logprob)))
    return pairs


def yes_probability(answer: dict, yes_token: str = "Yes", no_token: str = "No", relative_to_no: bool = True) -> float:
    """The judge's probability of yes from a chat completion's top-k logprobs (see the module docstring)."""
    top = _top_logprobs(answer)

    def mass(word: str) -> float:
        return sum(math.exp(lp) for token, lp in top if token.strip().lower() == word.strip().lower())

    p_yes = mass(yes_token)
    if not relative_to_no:
        return p_yes
    p_no = mass(no_token)
    if p_yes + p_no == 0.0:
        raise ValueError(f"neither {yes_token!r} nor {no_token!r} is among the top-{len(top)} tokens "
                         f"{[t for t, _ in top]}: ask a yes/no question, or raise top_logprobs")
    return p_yes / (p_yes + p_no)


def answer_text(answer: dict) -> str:
    message = _choice(answer).get("message")
    text = message.get("content") if isinstance(message, dict) else None
    if not isinstance(text, str):
        raise ValueError(f"malformed answer, no choices[0].message.content text: {json.dumps(answer)[:300]}")
    return text


def match_pattern(pattern: str | re.Pattern) -> str:
    return pattern.pattern if isinstance(pattern, re.Pattern) else pattern


def parse_number(text: str, pattern: str | re.Pattern, low: float, high: float, normalize: bool = True) -> float:
    """The number ``pattern`` finds in ``text`` (its first group that matched, or the whole match if it has no
    group), checked against ``[low, high]``; mapped to ``(x - low) / (high - low)`` when ``normalize``."""
    match = re.search(pattern, text)
    found = None
    if match is not None:
        found = next((g for g in match.groups() if g is not None), None) if match.re.groups else match.group(0)
    try:
        value = float(found)
    except (TypeError, ValueError):
        raise ValueError(f"no number in the answer {text[-300:]!r} (pattern {match_pattern(pattern)!r})") from None
    if not low <= value <= high:
        raise ValueError(f"the answer's number {value:g} is outside the range [{low:g}, {high:g}]: {text[-300:]!r}")
    return (value - low) / (high - low) if normalize else value


def _naming(err: Exception, where: str) -> Exception:
    """``err`` again (its type, so callers may still catch it) with ``where`` in front of its message."""
    try:
        return type(err)(f"{where}: {err}")
    except Exception:  # an exception type whose constructor takes other arguments
        return RuntimeError(f"{where}: {type(err).__name__}: {err}")


@register_reward("vlm_judge")
class VlmJudge:
    """A VLM's answer to a question about each sample, as a reward (see the module docstring).

    Args:
        template: the question; ``{prompt}`` (required) becomes the sample's prompt, ``{low}`` / ``{high}`` the
            ends of ``score_range``. Default: a yes/no question (logprob) or a 1-to-N rating (number).
        scoring: ``logprob`` (probability of ``yes_token``) or ``number`` (a number parsed from the answer).
        score_range: ``[low, high]`` of the number (number scoring; required there).
        normalize: number scoring: map the number to [0, 1]; false keeps it raw.
        number_pattern: a regex finding the number (its first matching group); default ``Final Score: x``, or an
            answer that is only a number.
        yes_token, no_token: logprob scoring: the words whose token variants are summed.
        relative_to_no: logprob scoring: ``P(yes) / (P(yes) + P(no))`` (default, as ``vllm_evaluate``); false gives
            ``P(yes)``.
        top_logprobs: logprob scoring: how many top tokens the server returns (OpenAI allows up to 20).
        max_tokens: number scoring: the answer's length limit (a judge that reasons before its score needs room).
        model: the served model's name (default ``FLOWRL_VLM_MODEL``, else the server's only model).
        base_url: the server's OpenAI API root, e.g. ``http://127.0.0.1:8000/v1`` (default ``FLOWRL_VLM_BASE_URL``).
        api_key: a bearer token (default ``FLOWRL_VLM_API_KEY``; none sends no header).
        system_prompt: an optional system message.
        video_frames: frames sent per video, spread from first to last. 4 shows the start, the motion and the end
            while keeping the request small: each frame costs the judge hundreds of visual tokens, and servers cap
            the images per prompt (vLLM: ``--limit-mm-per-prompt '{"image": 5}'``).
        concurrency: requests in flight at once (one per sample; the batch's order is kept).
        timeout: seconds a request may wait on the server before it counts as failed.
        retries: attempts per request; a connection error, timeout, 5xx or 429 is retried with exponential
            backoff from ``backoff`` seconds, any other 4xx is not.
        check_server: ask ``GET {base_url}/models`` when built, so that a judge that is down, refuses the key or
            does not serve the model stops the run before any work.
        extra_body: more request fields, e.g. ``{chat_template_kwargs: {enable_thinking: false}}`` for a
            reasoning judge whose first token must be the answer.
    """

    uses_condition_images = True  # __call__ takes condition_images=[per-sample list of (C, H, W)] for edits

    def __init__(self, template: str | None = None, scoring: str = "logprob",
                 score_range: Sequence[float] | None = None, normalize: bool = True,
                 number_pattern: str | None = None, yes_token: str = "Yes", no_token: str = "No",
                 relative_to_no: bool = True, top_logprobs: int = 20, max_tokens: int = 512,
                 model: str | None = None, base_url: str | None = None, api_key: str | None = None,
                 system_prompt: str | None = None, video_frames: int = 4, concurrency: int = 8,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.5, temperature: float = 0.0,
                 check_server: bool = True, extra_body: dict[str, Any] | None = None):
        if scoring not in SCORINGS:
            raise ConfigError(f"vlm_judge scoring must be one of {', '.join(SCORINGS)}; got {scoring!r}")
        if scoring == "number":
            if score_range is None or len(score_range) != 2 or not float(score_range[0]) < float(score_range[1]):
                raise ConfigError(f"vlm_judge scoring: number needs score_range: [low, high] with low < high (the "
                                  f"scale the question states); got {score_range!r}")
            self.low, self.high = float(score_range[0]), float(score_range[1])
        else:
            self.low, self.high = 0.0, 1.0
        template = template if template is not None else NUMBER_TEMPLATE if scoring == "number" else YES_NO_TEMPLATE
        if "{prompt}" not in template:
            raise ConfigError(f"vlm_judge template {template!r} has no {{prompt}} placeholder; add {{prompt}} where "
                              "the sample's prompt goes")
        for name, value in (("top_logprobs", top_logprobs), ("max_tokens", max_tokens), ("video_frames", video_frames),
                            ("concurrency", concurrency), ("retries", retries)):
            if int(value) < 1:
                raise ConfigError(f"vlm_judge {name} must be >= 1; got {value}")
        if timeout <= 0 or backoff < 0:
            raise ConfigError(f"vlm_judge timeout must be > 0 and backoff >= 0; got {timeout}, {backoff}")
        try:
            self.number_pattern = re.compile(number_pattern or NUMBER_PATTERN)
        except re.error as err:
            raise ConfigError(f"vlm_judge number_pattern {number_pattern!r} is not a regex ({err}); fix it") from err
        self.template, self.scoring, self.normalize = template, scoring, bool(normalize)
        self.yes_token, self.no_token, self.relative_to_no = yes_token, no_token, bool(relative_to_no)
        self.top_logprobs, self.max_tokens, self.temperature = int(top_logprobs), int(max_tokens), float(temperature)
        self.system_prompt, self.video_frames, self.concurrency = system_prompt, int(video_frames), int(concurrency)
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.extra_body = dict(extra_body or {})
        self.base_url = (base_url or os.environ.get("FLOWRL_VLM_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        key = api_key or os.environ.get("FLOWRL_VLM_API_KEY")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.model = model or os.environ.get("FLOWRL_VLM_MODEL")
        if check_server:
            self.model = self._check_server(self.model)
        elif not self.model:
            raise ConfigError("vlm_judge needs the model's name: set model (or FLOWRL_VLM_MODEL), or leave "
                              "check_server on to use the server's only model")

    def _check_server(self, model: str | None) -> str:
        """The model to ask, after ``GET /models`` shows the server up, the key accepted and the model served."""
        url = f"{self.base_url}/models"
        request = urllib.request.Request(url, headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=min(self.timeout, 10.0)) as r:
                served = [m["id"] for m in json.loads(r.read())["data"]]
        except urllib.error.HTTPError as err:
            fix = "set FLOWRL_VLM_API_KEY (or api_key) to the server's key" if err.code in (401, 403) else \
                "point base_url at the API root (it ends in /v1 on vLLM and SGLang), or set check_server: false " \
                "for a server without /models"
            raise ConfigError(f"vlm_judge: {url} answered HTTP {err.code}; {fix}") from None
        except (OSError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", err)
            raise ConfigError(f"vlm_judge: no OpenAI-compatible server answers at {url} ({reason}); start one (e.g. "
                              "`vllm serve Qwen/Qwen2.5-VL-7B-Instruct --port 8000`) or fix base_url / "
                              "FLOWRL_VLM_BASE_URL") from None
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"vlm_judge: {url} did not answer an OpenAI model list ({type(err).__name__}: {err}); "
                              "point base_url at the API root (e.g. http://host:8000/v1)") from None
        if model is None:
            if len(served) != 1:
                raise ConfigError(f"vlm_judge: the server at {self.base_url} serves {served}; set model to one of them")
            return served[0]
        if model not in served:
            raise ConfigError(f"vlm_judge: the server at {self.base_url} serves {served}, not {model!r}; set model "
                              "to one of them")
        return model

    def question(self, prompt: str) -> str:
        return (self.template.replace("{prompt}", prompt).replace("{low}", f"{self.low:g}")
                .replace("{high}", f"{self.high:g}"))

    def request(self, pictures: Sequence[torch.Tensor], prompt: str) -> dict[str, Any]:
        """The chat-completion request for one sample: its pictures (conditions first) then the question."""
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + encode_png(p)}} for p in pictures]
        content.append({"type": "text", "text": self.question(prompt)})
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        body: dict[str, Any] = {"model": self.model, "messages": [*messages, {"role": "user", "content": content}],
                                "temperature": self.temperature}
        if self.scoring == "logprob":
            body.update(max_tokens=1, logprobs=True, top_logprobs=self.top_logprobs)
        else:
            body.update(max_tokens=self.max_tokens)
        return {**body, **self.extra_body}

    def score_answer(self, answer: dict) -> float:
        if self.scoring == "logprob":
            return yes_probability(answer, self.yes_token, self.no_token, self.relative_to_no)
        return parse_number(answer_text(answer), self.number_pattern, self.low, self.high, self.normalize)

    def _score_one(self, index: int, pictures: Sequence[torch.Tensor], prompt: str) -> float:
        try:
            answer = post_json(f"{self.base_url}/chat/completions", self.request(pictures, prompt), self._headers,
                               self.timeout, self.retries, self.backoff)
            return self.score_answer(answer)
        except Exception as err:  # the same error, naming the sample, so the batch's failure message points at it
            raise _naming(err, f"vlm_judge sample {index} ({prompt[:60]!r})") from err

    def __call__(self, images: torch.Tensor, prompts: Sequence[str],
                 condition_images: Sequence[Sequence[torch.Tensor] | torch.Tensor | None] | None = None,
                 ) -> torch.Tensor:
        """Scores ``(B, C, H, W)`` images or ``(B, T, C, H, W)`` videos; ``condition_images`` (edits): per sample a
        list of ``(C, H, W)`` in [0, 1] (or a ``(N, C, H, W)`` tensor, or None), sent before the sample."""
        if images.ndim not in (4, 5) or images.shape[0] != len(prompts):
            raise ValueError(f"vlm_judge: expected (B, C, H, W) images or (B, T, C, H, W) videos for {len(prompts)} "
                             f"prompts; got {tuple(images.shape)}")
        if condition_images is not None and len(condition_images) != len(prompts):
            raise ValueError(f"vlm_judge: {len(condition_images)} condition-image entries for {len(prompts)} prompts")
        images = images.detach().float().cpu()
        samples = []
        for i, prompt in enumerate(prompts):
            own = list(select_frames(images[i], self.video_frames)) if images.ndim == 5 else [images[i]]
            conditions = condition_images[i] if condition_images is not None else None
            conditions = [] if conditions is None else list(conditions)
            samples.append((i, [c.detach().float().cpu() for c in conditions] + own, prompt))
        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(len(samples), 1))) as pool:
            scores = list(pool.map(lambda s: self._score_one(*s), samples))
        return torch.tensor(scores, dtype=torch.float32)
