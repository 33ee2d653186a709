"""OCR reward: does the image show the text the prompt quotes? (Flow-GRPO's text-rendering reward.)

The target is the prompt's first double-quoted span (``a sign that says "OPEN"`` -> ``OPEN``); the recognised
text is everything the OCR engine reads, joined. Both are compared lower-cased without spaces:
``score = 1 - min(Levenshtein(recognised, target), len(target)) / len(target)`` (1: exact, 0: nothing right).
The engine is RapidOCR with ONNX Runtime (``pip install -e .[rewards]``), whose wheel carries its models, so the
reward runs offline; ``engine`` takes any callable ``image array -> list of strings`` instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np
import torch

from flowrl.errors import ConfigError
from flowrl.rewards.base import to_uint8
from flowrl.rewards.registry import register_reward

__all__ = ["OcrReward", "quoted_text", "text_score"]

_QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”')


def quoted_text(prompt: str) -> str | None:
    """The prompt's first double-quoted span, or None."""
    m = _QUOTED.search(prompt)
    return None if m is None else (m.group(1) or m.group(2))


def _normalise(text: str) -> str:
    return "".join(text.split()).lower()


def text_score(recognised: str, target: str) -> float:
    """``1 - min(edit distance, len(target)) / len(target)`` on lower-cased, space-free text."""
    from rapidfuzz.distance import Levenshtein

    rec, tgt = _normalise(recognised), _normalise(target)
    if not tgt:
        raise ValueError("the target text is empty")
    return 1.0 - min(Levenshtein.distance(rec, tgt), len(tgt)) / len(tgt)


def rapidocr_engine(**params) -> Callable[[np.ndarray], list[str]]:
    try:
        from rapidocr import RapidOCR
    except ImportError as err:
        raise ConfigError("the ocr reward needs RapidOCR: pip install -e .[rewards] (rapidocr, onnxruntime)") from err
    engine = RapidOCR(params=params or None)

    def read(image: np.ndarray) -> list[str]:
        txts = getattr(engine(image), "txts", None)  # None when nothing is read
        return list(txts) if txts else []

    return read


@register_reward("ocr")
class OcrReward:
    """Text rendering accuracy of the quoted text in each prompt (see the module docstring).

    Args:
        engine: ``image (H, W, 3) uint8 -> recognised strings``; default RapidOCR (its ``params`` as ``engine_params``).
        missing_quote: the score of a prompt without quoted text: ``error`` (default) raises, a number is used.
    """

    def __init__(self, engine: Callable | None = None, engine_params: dict | None = None,
                 missing_quote: str | float = "error"):
        self.read = engine if engine is not None else rapidocr_engine(**(engine_params or {}))
        self.missing_quote = missing_quote

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        scores = []
        for image, prompt in zip(to_uint8(images), prompts):
            target = quoted_text(prompt)
            if target is None:
                if self.missing_quote == "error":
                    raise ValueError(f"ocr reward: the prompt {prompt!r} quotes no text (write it in double quotes, "
                                     "or set missing_quote to a score)")
                scores.append(float(self.missing_quote))
                continue
            scores.append(text_score(" ".join(self.read(image)), target))
        return torch.tensor(scores, dtype=torch.float32)
