"""The OCR reward on rendered text, with the real offline engine (RapidOCR + ONNX Runtime, models in the wheel)."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from flowrl.rewards import build_reward
from flowrl.rewards.ocr import OcrReward, quoted_text, text_score


def rendered(text: str, size=(320, 96)) -> torch.Tensor:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=48)
    draw.text((16, 20), text, fill="black", font=font)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def test_quoted_text_and_score():
    assert quoted_text('a shop sign that says "Fresh Bread"') == "Fresh Bread"
    assert quoted_text("a poster reading “SALE” in red") == "SALE"
    assert quoted_text("a cat") is None
    assert text_score("fresh bread", "Fresh Bread") == 1.0  # case and spaces do not count
    assert text_score("fresh brad", "Fresh Bread") == pytest.approx(1 - 1 / 10)
    assert text_score("", "Fresh Bread") == 0.0 and text_score("x" * 50, "abc") == 0.0


def test_right_text_scores_near_one_wrong_text_low():
    reward = build_reward("ocr")  # RapidOCR, offline
    images = torch.stack([rendered("HELLO"), rendered("HELLO"), rendered("GARDEN")])
    prompts = ['a sign that says "HELLO"', 'a sign that says "WORLD"', 'a board with "GARDEN" on it']
    scores = reward(images, prompts)
    assert scores[0] >= 0.8 and scores[2] >= 0.8, scores
    assert scores[1] <= 0.4, scores


def test_prompt_without_quotes_is_an_error_or_a_set_score():
    images = torch.stack([rendered("HI")])
    with pytest.raises(ValueError, match="quotes no text"):
        OcrReward(engine=lambda image: ["HI"])(images, ["a sign"])
    assert OcrReward(engine=lambda image: ["HI"], missing_quote=0.0)(images, ["a sign"]).tolist() == [0.0]
    assert OcrReward(engine=lambda image: ["H", "I"])(images, ['"HI"']).tolist() == [1.0]
