import json

import pytest
import torch

from flowrl.data import GroupBatchSampler, PromptDataModule, load_prompts


def test_load_txt_jsonl_and_inline(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n  a dog \n")
    assert load_prompts(str(txt)) == ["a cat", "a dog"]
    jl = tmp_path / "p.jsonl"
    jl.write_text("\n".join(json.dumps({"prompt": p, "tag": 1}) for p in ["x", "y"]))
    assert load_prompts(str(jl)) == ["x", "y"]
    assert load_prompts(["a", " b "]) == ["a", "b"]


def test_bad_prompt_sources_fail_with_the_fix(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="no prompts"):
        PromptDataModule(str(empty))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PromptDataModule(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="group_size >= 2"):
        PromptDataModule(["a"], group_size=1, batch_size=4)
    with pytest.raises(ValueError, match="multiple of 4"):
        PromptDataModule(["a"], group_size=4, batch_size=6)


@pytest.mark.parametrize("world_size", [1, 2])
def test_group_sampler_keeps_groups_whole_and_ids_unique(world_size):
    per_rank = {
        r: list(GroupBatchSampler(10, group_size=4, batch_size=8, seed=3, rank=r, world_size=world_size))
        for r in range(world_size)
    }
    n_batches = len(per_rank[0])
    for b in range(n_batches):
        seen_ids, seen_prompts = set(), []
        for r in range(world_size):
            batch = per_rank[r][b]
            assert len(batch) == 8
            for g in range(0, 8, 4):
                group = batch[g:g + 4]
                assert len({k for k in group}) == 1  # same prompt, same group id
                seen_ids.add(group[0][1])
                seen_prompts.append(group[0][0])
        assert len(seen_ids) == 2 * world_size
    # Every prompt is visited each epoch.
    visited = {k[0] for r in per_rank for batch in per_rank[r] for k in batch}
    assert visited == set(range(10))


def test_sampler_is_reproducible_and_reshuffles_per_epoch():
    a = GroupBatchSampler(20, 2, 4, seed=0)
    first, second = list(a), list(a)
    assert first != second
    b = GroupBatchSampler(20, 2, 4, seed=0)
    assert list(b) == first


def test_datamodule_batches(prompt_file):
    dm = PromptDataModule(prompt_file, val_prompts=["a", "b", "c"], group_size=2, batch_size=4, val_batch_size=2)
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["prompt"]) == 4 and batch["prompt"][0] == batch["prompt"][1]
    assert torch.equal(batch["group_id"], torch.tensor([0, 0, 1, 1]))
    val = list(dm.val_dataloader())
    assert [p for b in val for p in b["prompt"]] == ["a", "b", "c"]


def test_lightnings_distributed_sampler_is_refused_with_several_processes():
    """A user's own Trainer under DDP keeps Lightning's default use_distributed_sampler=True, whose sampler
    replacement would split groups: the DataModule says what to set instead."""
    from types import SimpleNamespace

    from flowrl.data import PromptDataModule
    from flowrl.errors import ConfigError

    dm = PromptDataModule(["a red circle", "two blue squares"], group_size=2, batch_size=4)
    for world, use, fails in [(2, True, True), (2, False, False), (1, True, False)]:
        dm.trainer = SimpleNamespace(world_size=world, global_rank=0,
                                     _accelerator_connector=SimpleNamespace(use_distributed_sampler=use))
        if fails:
            with pytest.raises(ConfigError, match="use_distributed_sampler=False"):
                dm.train_dataloader()
        else:
            assert len(list(dm.train_dataloader())) == 1


def test_max_train_prompts_keeps_the_first_prompts_and_is_checked(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("".join(f"prompt {i}\n" for i in range(10)))
    dm = PromptDataModule(str(path), group_size=2, batch_size=4, max_train_prompts=3)
    assert dm.train_prompts == ["prompt 0", "prompt 1", "prompt 2"]
    assert PromptDataModule(str(path), group_size=2, batch_size=4).train_prompts[-1] == "prompt 9"
    from flowrl.errors import ConfigError

    with pytest.raises(ConfigError, match="data.max_train_prompts"):
        PromptDataModule(str(path), group_size=2, batch_size=4, max_train_prompts=0)


def test_bad_bytes_and_bad_json_name_the_file_and_line(tmp_path):
    from flowrl.errors import ConfigError

    txt = tmp_path / "p.txt"
    txt.write_bytes(b"a red circle\n\nthree blue sq\xffuares\n")
    with pytest.raises(ConfigError, match=r"data.train_prompts: line 3 of .*p.txt is not UTF-8 \(byte 0xff at column 14\)"):
        load_prompts(str(txt), "data.train_prompts")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a"}\n\n{"prompt": "b"\n')
    with pytest.raises(ConfigError, match=r"line 3 of .*p.jsonl is not JSON"):
        load_prompts(str(jsonl))
    jsonl.write_text('{"prompt": "a"}\n\n["b"]\n')
    with pytest.raises(ConfigError, match=r"line 3 of .*p.jsonl has no 'prompt' field"):
        load_prompts(str(jsonl))
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffa red circle\r\ntwo squares\r\n".encode("utf-8"))
    assert load_prompts(str(bom)) == ["a red circle", "two squares"]
