import os
import sys
import warnings

import pytest
import torch

# The suite by layer: unit/ (pure functions, rewards, data), families/ (one adapter each), algorithms/, callbacks/,
# e2e/ (the CLI, configs, examples, docs, DDP, resume). Helpers shared across layers (tests/tiny.py, and a few
# test modules' fixtures such as test_cli.tiny_overrides) import from any of them.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(_HERE, layer) for layer in ("unit", "families", "algorithms", "callbacks", "e2e")]

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


@pytest.fixture(scope="session")
def tiny_pipeline_path(tmp_path_factory, tiny_sd3_path):
    """``tiny_pipeline_path("flux")``: a tiny random pipeline of that family saved with save_pretrained, built
    once per session (``flowrl.policy.tiny``)."""
    from flowrl.policy.tiny import FAMILIES, build_tiny_pipeline

    paths = {"sd3": tiny_sd3_path}

    def get(family: str) -> str:
        family = FAMILIES.get(family, family)
        if family not in paths:
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            build_tiny_pipeline(family).save_pretrained(path)
            paths[family] = str(path)
        return paths[family]

    return get


@pytest.fixture()
def one_process_mesh(tmp_path):
    """A device mesh over a process group of this process alone (gloo): FSDP2 shards on it as on many (DTensor
    parameters, all-gathers, reduce-scatters), within the test process; the group ends with the test."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    store = tmp_path / "process_group_store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
    dist.destroy_process_group()


@pytest.fixture()
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(TINY_PROMPTS) + "\n")
    return str(path)


def parsed_config(*configs: str) -> dict:
    """What ``flowrl fit --config A --config B ...`` amounts to (bases merged, defaults filled), as a mapping."""
    import contextlib
    import io

    import yaml

    from flowrl.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(["fit", *(a for c in configs for a in ("--config", c)), "--print_config"])
    return yaml.safe_load(out.getvalue())
