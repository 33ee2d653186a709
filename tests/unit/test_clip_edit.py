"""The CLIP editing reward on a tiny random CLIP saved to disk, against the formula computed by hand from the same
model: directional similarity of the image change to the text change, plus preservation of the condition image."""

import pytest
import torch
from test_clip_rewards import images, tiny_clip  # noqa: F401 (a fixture)

from flowrl.conditions import ConditionImages
from flowrl.errors import ConfigError
from flowrl.rewards import WeightedReward, build_reward


def by_hand(path, edited, sources, prompts, captions):
    from transformers import CLIPModel, CLIPProcessor

    from flowrl.rewards.base import to_pil

    model, processor = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)

    def unit(x):
        x = x.pooler_output if hasattr(x, "pooler_output") else x
        return x / x.norm(dim=-1, keepdim=True)

    with torch.no_grad():
        e = unit(model.get_image_features(**processor(images=to_pil(edited), return_tensors="pt")))
        s = unit(model.get_image_features(**processor(images=to_pil(sources), return_tensors="pt")))
        t = unit(model.get_text_features(**processor(text=prompts, padding=True, return_tensors="pt")))
        c = unit(model.get_text_features(**processor(text=captions, padding=True, return_tensors="pt")))
    di, dt = e - s, t - c
    direction = (di * dt).sum(-1) / (di.norm(dim=-1) * dt.norm(dim=-1))
    return direction, (e * s).sum(-1)


def test_clip_edit_is_direction_plus_preservation(tiny_clip):  # noqa: F811
    edited, sources = images(4, seed=1), images(4, seed=2)
    prompts = ["a red circle", "two blue squares", "a green triangle", "a circle"]
    captions = ["a blue circle", None, "a red triangle", None]
    conditions = [ConditionImages.from_tensors(s, caption=c) for s, c in zip(sources, captions)]
    reward = build_reward("clip_edit", model_name_or_path=tiny_clip, direction_weight=1.0, preservation_weight=0.5,
                          source_text="a photo")
    direction, preservation = by_hand(tiny_clip, edited, sources, prompts, [c or "a photo" for c in captions])
    terms = reward.terms(edited, prompts, conditions)
    torch.testing.assert_close(terms["direction"], direction, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["preservation"], preservation, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reward(edited, prompts, condition_images=conditions), direction + 0.5 * preservation,
                               rtol=1e-5, atol=1e-6)
    # the edit that returns the condition image unchanged keeps it perfectly (and has no direction)
    same = reward.terms(sources, prompts, conditions)
    torch.testing.assert_close(same["preservation"], torch.ones(4), rtol=1e-5, atol=1e-5)
    assert torch.all(same["direction"].abs() < 1e-4)
    # through WeightedReward: the batch's conditions reach the term that uses them
    total = WeightedReward({"edit": reward}, {"edit": 2.0})(edited, prompts, conditions=conditions)
    torch.testing.assert_close(total, 2 * (direction + 0.5 * preservation), rtol=1e-5, atol=1e-6)


def test_condition_images_of_other_sizes_are_embedded_each(tiny_clip):  # noqa: F811
    edited = images(2, seed=3)
    conditions = [ConditionImages.from_tensors(torch.rand(3, 24, 40)), ConditionImages.from_tensors(torch.rand(3, 40, 24))]
    reward = build_reward("clip_edit", model_name_or_path=tiny_clip)
    one = [reward(edited[i:i + 1], ["a red circle"], condition_images=conditions[i:i + 1]) for i in range(2)]
    torch.testing.assert_close(reward(edited, ["a red circle"] * 2, condition_images=conditions), torch.cat(one),
                               rtol=1e-5, atol=1e-6)


def test_clip_edit_refuses_what_it_cannot_score(tiny_clip):  # noqa: F811
    reward = build_reward("clip_edit", model_name_or_path=tiny_clip)
    with pytest.raises(ValueError, match="needs a condition image"):
        reward(images(2), ["a", "b"], condition_images=[None, None])
    scores = WeightedReward({"edit": reward}, {"edit": 1.0}).score(images(2), ["a", "b"])  # text-to-image samples
    assert scores.errors and "condition image" in scores.errors[0] and not scores.valid.any()
    with pytest.raises(ConfigError, match="at least one > 0"):
        build_reward("clip_edit", model_name_or_path=tiny_clip, direction_weight=0, preservation_weight=0)
