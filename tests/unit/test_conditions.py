"""Condition images from prompt files: rows naming images are checked before anything trains (each failure names the
file and the line), batches carry them per sample (a group shares its row's), and families refuse what they cannot
use."""

import json

import pytest
import torch
from PIL import Image

from flowrl.conditions import ConditionImages, load_condition_image
from flowrl.data import PromptDataModule, load_prompt_rows, load_prompts
from flowrl.errors import ConfigError
from flowrl.policy import FlowMatchingPolicy


def png(path, size=(24, 16), colour=(200, 30, 30)):
    Image.new("RGB", size, colour).save(path)
    return path


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_rows_name_images_relative_to_the_file_and_batches_carry_them(tmp_path):
    (tmp_path / "imgs").mkdir()
    png(tmp_path / "imgs" / "a.png")
    png(tmp_path / "imgs" / "b.png", colour=(0, 0, 255))
    path = jsonl(tmp_path / "edits.jsonl", [
        {"prompt": "make it blue", "images": ["imgs/a.png"], "source_prompt": "a red square"},
        {"prompt": "make it red", "image": "imgs/b.png"},
    ])
    rows = load_prompt_rows(path)
    assert rows.prompts == ["make it blue", "make it red"]
    assert rows.images == [(str(tmp_path / "imgs" / "a.png"),), (str(tmp_path / "imgs" / "b.png"),)]
    assert rows.captions == ["a red square", None]
    first = rows.condition(0)
    assert first.caption == "a red square" and first.sources == rows.images[0]
    (image,) = first.images
    assert image.shape == (3, 16, 24) and image.dtype == torch.float32
    assert torch.equal(image[:, 0, 0], torch.tensor([200, 30, 30]) / 255)
    # a group of the DataModule shares its row's images; the batch carries one entry per sample
    dm = PromptDataModule(path, group_size=2, batch_size=4)
    (batch,) = list(dm.train_dataloader())
    assert len(batch["condition_images"]) == 4
    for i in range(0, 4, 2):
        a, b = batch["condition_images"][i:i + 2]
        assert a.key == b.key and a.caption == b.caption
    assert {c.key for c in batch["condition_images"]} == {rows.condition(0).key, rows.condition(1).key}
    # a reader of plain prompts refuses a file whose rows need their images
    with pytest.raises(ConfigError, match="names condition images"):
        load_prompts(path)


@pytest.mark.parametrize("row, files, match", [
    ({"prompt": "x", "images": ["missing.png"]}, {}, r"line 2 of .*edits.jsonl: condition image .*missing.png.* does "
                                                      "not exist"),
    ({"prompt": "x", "images": ["junk.png"]}, {"junk.png": b"not an image at all"}, r"line 2 .*junk.png.* cannot be "
                                                                                   "decoded"),
    ({"prompt": "x", "images": ["tiny.png"]}, {"tiny.png": "small"}, r"line 2 .*tiny.png.* is 8x8; each side needs at "
                                                                     "least 16 px"),
    ({"prompt": "x", "images": []}, {}, r"line 2 .*'images' must be a non-empty list"),
    ({"prompt": "x", "images": "ok.png", "image": "ok.png"}, {}, r"line 2 .*both 'image' and 'images'"),
    ({"prompt": "x"}, {}, r"some rows of .* name condition images and some do not"),
])
def test_a_bad_image_row_is_refused_naming_the_file_and_the_line(tmp_path, row, files, match):
    png(tmp_path / "ok.png")
    for name, content in files.items():
        if content == "small":
            png(tmp_path / name, size=(8, 8))
        else:
            (tmp_path / name).write_bytes(content)
    path = jsonl(tmp_path / "edits.jsonl", [{"prompt": "fine", "images": ["ok.png"]}, row])
    with pytest.raises(ConfigError, match=match):
        PromptDataModule(path, group_size=2, batch_size=2)


def test_a_truncated_png_is_refused_before_training(tmp_path):
    good = png(tmp_path / "big.png", size=(64, 64))
    data = good.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    path = jsonl(tmp_path / "edits.jsonl", [{"prompt": "x", "images": ["cut.png"]}])
    with pytest.raises(ConfigError, match=r"line 1 .*cut.png.* cannot be decoded"):
        load_prompt_rows(path, "data.train_prompts")


def test_condition_images_key_by_content_and_load_once(tmp_path):
    a = png(tmp_path / "a.png")
    b = png(tmp_path / "b.png")  # the same pixels in another file
    assert ConditionImages.from_files([str(a)]).key == ConditionImages.from_files([str(b)]).key
    other = png(tmp_path / "c.png", colour=(1, 2, 3))
    assert ConditionImages.from_files([str(other)]).key != ConditionImages.from_files([str(a)]).key
    assert load_condition_image(str(a)) is load_condition_image(str(a))  # a group's rows decode once
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        ConditionImages([torch.zeros(1, 8, 8)])


def test_a_text_family_refuses_condition_images_and_the_area_option(tiny_sd3_path, tmp_path):
    policy = FlowMatchingPolicy.from_pretrained(tiny_sd3_path, lora_rank=2)
    images = [ConditionImages.from_tensors(torch.rand(3, 16, 16))]
    with pytest.raises(ConfigError, match="takes no condition images.*prompt file without images"):
        policy.encode_prompt(["x"], images, 16, 16)
    with pytest.raises(ConfigError, match="condition_image_area is set, but StableDiffusion3Pipeline takes no"):
        FlowMatchingPolicy.from_pretrained(tiny_sd3_path, lora_rank=2, condition_image_area=4096)


def test_a_training_run_of_a_text_family_on_an_editing_file_fails_before_work(tiny_sd3_path, tmp_path, monkeypatch,
                                                                             capsys):
    from flowrl.cli import console_main

    png(tmp_path / "a.png")
    path = jsonl(tmp_path / "edits.jsonl", [{"prompt": "x", "images": ["a.png"]}, {"prompt": "y", "images": ["a.png"]}])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        console_main(["fit", "--config", _toy_config(), "--data.train_prompts=" + path, "--trainer.max_steps=1",
                      "--trainer.accelerator=cpu", "--trainer.num_sanity_val_steps=0"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "takes no condition images" in err and "Traceback" not in err


def _toy_config():
    import os

    return os.path.join(os.path.dirname(__file__), "..", "..", "lightning_configs", "toy", "grpo.yaml")


def test_tensors_held_per_sample_move_with_the_conditioning_and_count_in_the_prompt_cache():
    """Condition-image latents are held per sample (each its own size): they move with ``to`` and the prompt cache
    keeps and counts them on the host (an editing run's cache stays within its budget)."""
    from flowrl.policy.adapter import Conditioning
    from flowrl.policy.prompt_cache import PromptCache

    image = ConditionImages.from_tensors(torch.rand(3, 16, 16))
    row = Conditioning({"embeds": torch.zeros(1, 4)}, {"image_latents": [torch.ones(4, 8, 8)], "condition": [image]})
    assert row.to("meta")["image_latents"][0].device.type == "meta" and row.to("meta")["condition"][0] is image
    cache = PromptCache(1.0)
    cache.put("k", row)
    assert cache.nbytes == 4 * 4 + 4 * 64 * 4 + 3 * 256 * 4
    kept = cache.get("k")
    assert torch.equal(kept["image_latents"][0], row["image_latents"][0])
    assert kept["image_latents"][0].data_ptr() != row["image_latents"][0].data_ptr()  # the cache's own copy
