"""CLIP score, PickScore, PickScore rank and the aesthetic predictor on a tiny random CLIP saved to disk, loaded
through the same ``from_pretrained`` path as the hub models, against the authors' way of computing each score."""

import pytest
import torch

from flowrl.rewards import WeightedReward, build_reward
from flowrl.toy import TOY_CHECKPOINT


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    path = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = CLIPTokenizer.from_pretrained(TOY_CHECKPOINT / "tokenizer")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(path)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(path)
    return str(path)


def images(n=4, seed=0):
    return torch.randint(0, 256, (n, 3, 40, 40), generator=torch.Generator().manual_seed(seed)).float() / 255


PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a circle"]


def authors_scores(path, imgs, prompts):
    """PickScore's published inference code, on the same model: normalised embeddings, logit_scale * cos."""
    from transformers import CLIPModel, CLIPProcessor

    from flowrl.rewards.base import to_pil

    model, processor = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    with torch.no_grad():
        image_inputs = processor(images=to_pil(imgs), return_tensors="pt")
        text_inputs = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")

        def features(out):
            return out.pooler_output if hasattr(out, "pooler_output") else out

        image_embs = features(model.get_image_features(**image_inputs))
        text_embs = features(model.get_text_features(**text_inputs))
        image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
        text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
    return model, (text_embs * image_embs).sum(-1), image_embs


def test_pickscore_and_clip_score_as_their_authors_compute_them(tiny_clip):
    imgs = images()
    model, cos, _ = authors_scores(tiny_clip, imgs, PROMPTS)
    pick = build_reward("pickscore", model_name_or_path=tiny_clip, processor_name_or_path=tiny_clip)
    torch.testing.assert_close(pick(imgs, PROMPTS), model.logit_scale.exp().detach() * cos, atol=1e-5, rtol=1e-5)
    scaled = build_reward("pickscore", model_name_or_path=tiny_clip, processor_name_or_path=tiny_clip, scale=1 / 26)
    torch.testing.assert_close(scaled(imgs, PROMPTS), pick(imgs, PROMPTS) / 26)
    clip = build_reward("clip_score", model_name_or_path=tiny_clip, batch_size=3)  # two batches
    torch.testing.assert_close(clip(imgs, PROMPTS), cos, atol=1e-5, rtol=1e-5)
    assert clip(imgs, PROMPTS).abs().max() <= 1.0 + 1e-6


def test_pickscore_rank_is_groupwise(tiny_clip):
    imgs = images(6, seed=1)
    prompts = ["a red circle"] * 3 + ["two blue squares"] * 3
    kwargs = {"model_name_or_path": tiny_clip, "processor_name_or_path": tiny_clip}
    raw = build_reward("pickscore", **kwargs)(imgs, prompts)
    reward = WeightedReward.from_specs([{"name": "pickscore_rank", "args": kwargs}])
    ranks = reward(imgs, prompts, torch.tensor([0, 0, 0, 1, 1, 1]))
    for group in (slice(0, 3), slice(3, 6)):  # each group ranked on its own: 0, 1/3, 2/3
        assert sorted(ranks[group].tolist()) == pytest.approx([0, 1 / 3, 2 / 3])
        assert ranks[group].argsort().tolist() == raw[group].argsort().tolist()
    torch.testing.assert_close(reward(imgs, prompts), ranks)  # no ids: groups are the equal prompts


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_aesthetic_head_on_the_normalised_clip_embedding(tiny_clip, tmp_path, suffix):
    from flowrl.rewards.clip import AestheticHead

    torch.manual_seed(3)
    head = AestheticHead(16).eval()
    path = tmp_path / f"head{suffix}"
    if suffix == ".pth":
        torch.save(head.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(head.state_dict(), path)
    imgs = images()
    _, _, image_embs = authors_scores(tiny_clip, imgs, PROMPTS)
    reward = build_reward("aesthetic", head_path=str(path), model_name_or_path=tiny_clip)
    assert sorted(head.state_dict()) == [f"layers.{i}.{k}" for i in (0, 2, 4, 6, 7) for k in ("bias", "weight")]
    with torch.no_grad():
        torch.testing.assert_close(reward(imgs, PROMPTS), head(image_embs).squeeze(-1), atol=1e-5, rtol=1e-5)
