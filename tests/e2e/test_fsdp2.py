"""FSDP2 on two CPU processes (gloo, ``callbacks.FSDP2Strategy``): the run of two sharded processes is the run of one
process on the same global batch (samples, rewards, advantages, weights and the EMA average after two optimizer
steps), for GRPO and for NFT with EMA, off-policy sampling and a full-copy KL reference held shard by shard.

Each case runs ``tests/e2e/ddp_run.py`` as a script (the strategy starts the second process by running it again)."""

import os

import pytest
from test_ddp import ROOT, check_world_size_invariance, wait, world_size_runs

TOY = os.path.join(ROOT, "lightning_configs", "toy")
FSDP2 = ["--config", os.path.join(ROOT, "lightning_configs", "strategies", "fsdp2_toy.yaml"), "--trainer.devices=2"]


@pytest.mark.parametrize("algorithm", ["grpo", "nft"])
def test_two_fsdp2_processes_give_the_run_of_one(tmp_path, algorithm):
    runs = world_size_runs(tmp_path, os.path.join(TOY, f"{algorithm}.yaml"), FSDP2)
    single, ranks = check_world_size_invariance(runs, tmp_path)
    returncode, stderr, _ = wait(runs["ok"], tmp_path / "ok")
    assert returncode == 0, stderr[-4000:]
    assert all(r["strategy"] == "FSDP2Strategy" and r["world_size"] == 2 and r["global_step"] == 2 for r in ranks)
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # gathered whole: the same model on both
    if algorithm == "nft":  # the EMA is the sampling policy and the KL reference a copy: both held as shards
        assert single["ema_checksum"] > 0 and ranks[0]["ema_checksum"] == ranks[1]["ema_checksum"]
        check_export_of_the_sharded_checkpoint(tmp_path, os.path.join(TOY, f"{algorithm}.yaml"))


def check_export_of_the_sharded_checkpoint(tmp_path, config):
    """``flowrl export`` of the sharded ``last.ckpt`` (a folder of each process's shards) writes the pipeline folder
    the one-process run's ``last.ckpt`` (a file) gives: the same files, the same weights (the runs agree to float
    rounding), the EMA average too (``--ema``, joined from its shards)."""
    import torch
    from safetensors.torch import load_file

    from flowrl.export import export_checkpoint

    sharded, whole = (tmp_path / run / "root" / "checkpoints" / "last.ckpt" for run in ("ok", "one"))
    assert sharded.is_dir() and whole.is_file()
    for ema in (False, True):
        outs = [export_checkpoint(ckpt, config, tmp_path / f"export-{ckpt.parent.parent.parent.name}-{ema}", ema=ema)
                for ckpt in (sharded, whole)]
        files = [sorted(p.relative_to(o).as_posix() for p in __import__("pathlib").Path(o).rglob("*") if p.is_file())
                 for o in outs]
        assert files[0] == files[1] and any(f.endswith(".safetensors") for f in files[0])
        for name in [f for f in files[0] if f.startswith("transformer/") and f.endswith(".safetensors")]:
            a, b = (load_file(os.path.join(o, name)) for o in outs)
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
