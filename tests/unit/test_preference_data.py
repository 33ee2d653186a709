"""The offline preference DataModule: a JSONL of (prompt, chosen, rejected) image paths, every image checked before
training (exists, decodes, has the configured size), batches of prompts and image tensors in [0, 1]."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from flowrl.errors import ConfigError
from flowrl.preference_data import PreferenceDataModule, load_preference_pairs


def write_png(path, size=(16, 16), value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[0], size[1], 3), value, dtype=np.uint8)).save(path)


def make_set(tmp_path, n=3, size=(16, 16)):
    """``n`` valid pairs under ``tmp_path/prefs``: images/i_c.png (chosen, value 200) and i_r.png (value 50)."""
    root = tmp_path / "prefs"
    records = []
    for i in range(n):
        write_png(root / "images" / f"{i}_c.png", size, 200)
        write_png(root / "images" / f"{i}_r.png", size, 50)
        records.append({"prompt": f"prompt {i}", "chosen": f"images/{i}_c.png", "rejected": f"images/{i}_r.png"})
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_batches_hold_prompts_and_images_in_unit_range(tmp_path):
    path = make_set(tmp_path, n=3)
    dm = PreferenceDataModule(str(path), resolution=16, batch_size=2, shuffle=False, val_prompts=["a circle"])
    assert dm.resolution == (16, 16) and len(dm.pairs) == 3
    batch = next(iter(dm.train_dataloader()))
    assert batch["prompt"] == ["prompt 0", "prompt 1"]
    for key, value in (("chosen", 200), ("rejected", 50)):
        images = batch[key]
        assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
        assert 0.0 <= images.min() and images.max() <= 1.0
        assert torch.allclose(images, torch.full_like(images, value / 255))
    assert next(iter(dm.val_dataloader()))["prompt"] == ["a circle"]


@pytest.mark.parametrize("problem, message", [
    ("missing", "does not exist"),
    ("undecodable", "cannot be decoded as an image"),
    ("wrong_size", "is 16x24 (height x width), not the configured resolution 16x16"),
])
def test_a_bad_image_is_refused_naming_the_file_and_line(tmp_path, problem, message):
    path = make_set(tmp_path, n=3)
    bad = tmp_path / "prefs" / "images" / "1_r.png"  # line 2's rejected image
    if problem == "missing":
        bad.unlink()
    elif problem == "undecodable":
        bad.write_bytes(b"this is not a png at all")
    else:
        write_png(bad, size=(16, 24))
    with pytest.raises(ConfigError) as error:
        PreferenceDataModule(str(path), resolution=16)
    text = str(error.value)
    assert f"{path}, line 2: rejected image {bad} {message}" in text, text
    assert "1 problem(s)" in text


def test_every_problem_in_one_error_and_record_errors_name_the_line(tmp_path):
    path = make_set(tmp_path, n=2)
    (tmp_path / "prefs" / "images" / "0_c.png").unlink()
    with open(path, "a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"prompt": "x", "chosen": "images/1_c.png"}) + "\n")
    with pytest.raises(ConfigError) as error:
        load_preference_pairs(str(path), 16, 16)
    text = str(error.value)
    assert "3 problem(s)" in text
    assert re.search(r"line 1: chosen image .*0_c\.png does not exist", text)
    assert "line 3: not valid JSON" in text and "line 4: no 'rejected' field" in text


def test_missing_file_and_bad_options(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        PreferenceDataModule(str(tmp_path / "nowhere.jsonl"), resolution=16)
    path = make_set(tmp_path, n=1)
    with pytest.raises(ConfigError, match=r"data.batch_size=0 is out of range: it must be >= 1"):
        PreferenceDataModule(str(path), resolution=16, batch_size=0)


def test_the_shipped_toy_set_loads():
    dm = PreferenceDataModule("toy:pairs", resolution=32, batch_size=4)
    assert len(dm.pairs) >= 16
    assert {"a circle", "a square"} <= {p.prompt for p in dm.pairs}
    batch = next(iter(dm.train_dataloader()))
    assert batch["chosen"].shape == (4, 3, 32, 32)
    with pytest.raises(ConfigError, match="not the configured resolution 16x16"):
        PreferenceDataModule("toy:pairs", resolution=16)


def test_a_line_that_is_not_utf8_is_refused_naming_the_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'\n{"prompt": "a \xe9", "chosen": "c.png", "rejected": "r.png"}\n')
    with pytest.raises(ConfigError, match=r"line 2 of .*pairs.jsonl is not UTF-8 \(byte 0xe9"):
        load_preference_pairs(str(path), 8, 8)
