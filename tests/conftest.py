import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*torchvision.*")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a photo of a cat"]


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory):
    """A tiny random SD3 pipeline saved with save_pretrained (the real loading path reads it back)."""
    from flowrl.toy.pipeline import build_tiny_sd3_pipeline

    path = tmp_path_factory.mktemp("tiny-sd3")
    build_tiny_sd3_pipeline(seed=0, sample_size=16, num_layers=1, vae_channels=8).save_pretrained(path)
    return str(path)


@pytest.fixture()
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(TINY_PROMPTS) + "\n")
    return str(path)
