"""A checkpoint that cannot resume a run is refused before any work, in one line naming the file and the cause:
truncated (a file or a shard of a sharded folder), an incomplete folder, another algorithm, another number of
processes, other trained parameters."""

import os

import pytest
import torch
from tiny import make_module

from flowrl.algorithms import GRPO, NFT
from flowrl.checkpoint import check_checkpoint_files, check_resume
from flowrl.errors import ConfigError


@pytest.fixture(scope="module")
def module(tiny_sd3_path):
    return make_module(GRPO, tiny_sd3_path, finetune_type="lora")


def trained(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def write(path, module, **meta):
    torch.save({"state_dict": trained(module), "flowrl_algorithm": "GRPO", "flowrl_world_size": 1, **meta}, path)
    return path


def test_a_whole_checkpoint_of_the_same_run_passes(module, tmp_path):
    check_resume(write(tmp_path / "last.ckpt", module), module, world_size=1)


def test_a_truncated_file_is_refused_with_its_size(module, tmp_path):
    path = write(tmp_path / "last.ckpt", module)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ConfigError, match=rf"checkpoint '.*last.ckpt' is truncated or not a checkpoint \({size // 2} bytes"):
        check_resume(path, module, world_size=1)


@pytest.mark.parametrize("meta, world_size, message", [
    ({"flowrl_algorithm": "NFT"}, 1, "was written by NFT, this run trains GRPO"),
    ({"flowrl_world_size": 2}, 1, r"was written by 2 process\(es\), this run has 1"),
    ({}, 4, r"was written by 1 process\(es\), this run has 4"),
], ids=["another-algorithm", "more-processes", "fewer-processes"])
def test_another_algorithm_or_number_of_processes_is_refused(module, tmp_path, meta, world_size, message):
    path = write(tmp_path / "last.ckpt", module, **meta)
    with pytest.raises(ConfigError, match=message):
        check_resume(path, module, world_size=world_size)


def test_other_trained_parameters_are_refused(module, tiny_sd3_path, tmp_path):
    full = make_module(NFT, tiny_sd3_path, finetune_type="full")
    path = write(tmp_path / "full.ckpt", full, flowrl_algorithm="GRPO")
    with pytest.raises(ConfigError, match=r"holds other trained parameters than this model: it lacks \(\d+, e.g. .*lora"):
        check_resume(path, module, world_size=1)


def sharded_folder(tmp_path, module):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "last.ckpt"
    dcp.save({"state_dict": trained(module)}, checkpoint_id=folder, no_dist=True)
    torch.save({"flowrl_algorithm": "GRPO", "flowrl_world_size": 1}, folder / "meta.pt")
    return folder


def test_a_sharded_folder_with_a_short_or_missing_shard_or_index_is_refused(module, tmp_path):
    folder = sharded_folder(tmp_path, module)
    check_resume(folder, module, world_size=1)
    shard = next(p for p in folder.iterdir() if p.suffix == ".distcp")
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(ConfigError, match=rf"shard file {shard.name} is truncated \({size - 10} of {size} bytes\)"):
        check_checkpoint_files(folder)
    shard.unlink()
    with pytest.raises(ConfigError, match=f"shard file {shard.name} is missing"):
        check_checkpoint_files(folder)
    (folder / "meta.pt").unlink()
    with pytest.raises(ConfigError, match="is a folder without meta.pt: not a complete sharded checkpoint"):
        check_checkpoint_files(folder)


def test_flowrl_fit_refuses_a_truncated_checkpoint_in_one_line(tmp_path, capsys):
    from flowrl.cli import console_main

    path = tmp_path / "last.ckpt"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 100)  # the start of a checkpoint whose save was killed
    toy = os.path.join(os.path.dirname(__file__), "..", "..", "lightning_configs", "toy", "grpo.yaml")
    with pytest.raises(SystemExit) as info:
        console_main(["fit", "--config", toy, "--trainer.precision=32-true", f"--ckpt_path={path}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint '{path}' is truncated or not a checkpoint (104 bytes")
    assert len(err.strip().splitlines()) == 1


def test_flowrl_fit_refuses_another_algorithms_checkpoint_before_reading_its_options(module, tmp_path, capsys):
    """Lightning merges a checkpoint's hyper-parameters into the config before building anything: GRPO's options
    in an NFT run would fail as options NFT does not take; the algorithm is named first."""
    from flowrl.cli import console_main

    path = write(tmp_path / "grpo.ckpt", module, hyper_parameters={"clip_range": 0.2})
    toy = os.path.join(os.path.dirname(__file__), "..", "..", "lightning_configs", "toy", "nft.yaml")
    with pytest.raises(SystemExit) as info:
        console_main(["fit", "--config", toy, "--trainer.precision=32-true", f"--ckpt_path={path}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: checkpoint '{path}' was written by GRPO, this run trains NFT: resume with the "
                           "run's own config (its config.yaml beside the checkpoints)")
