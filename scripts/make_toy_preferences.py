"""Make the toy world's offline preference set (``flowrl/toy/preferences/``) for offline Diffusion-DPO.

For each prompt the shipped toy model samples a group of images (ODE, CFG, seeded); the shapes verifier scores them
(its graded score); the best image becomes "chosen" and the worst "rejected" (a group whose scores are all equal is
skipped). The pairs go to ``pairs.jsonl`` (``{"prompt", "chosen", "rejected"}``, image paths relative to it) and the
images to ``images/`` as PNG. Deterministic for a given seed and model.

    python scripts/make_toy_preferences.py                 # the shipped set
    python scripts/make_toy_preferences.py --out /tmp/prefs --extra-prompts 100
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from flowrl.policy import FlowMatchingPolicy  # noqa: E402
from flowrl.rollout import RolloutSampler, per_sample_generators  # noqa: E402
from flowrl.toy import TOY_DIR, TOY_TRAIN_PROMPTS  # noqa: E402
from flowrl.toy.verifier import ShapesReward  # noqa: E402

#: the prompts of the short learning check (tests/e2e/test_toy_learning.py), several groups each
CORE_PROMPTS = ["a circle", "a square"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(TOY_DIR / "preferences"), help="output folder (pairs.jsonl, images/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt the pair is chosen from")
    parser.add_argument("--core-groups", type=int, default=12, help="groups of each of the core prompts")
    parser.add_argument("--extra-prompts", type=int, default=40, help="other training prompts, one group each")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="sampling steps")
    parser.add_argument("--guidance-scale", type=float, default=4.5)
    return parser.parse_args(argv)


def save_png(image: torch.Tensor, path: str) -> None:
    from PIL import Image

    array = (image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    Image.fromarray(np.ascontiguousarray(array)).save(path, optimize=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    with open(TOY_TRAIN_PROMPTS, encoding="utf-8") as f:
        train = [line.strip() for line in f if line.strip() and line.strip() not in CORE_PROMPTS]
    extra = random.Random(args.seed).sample(train, args.extra_prompts)
    prompts = [p for p in CORE_PROMPTS for _ in range(args.core_groups)] + extra
    policy = FlowMatchingPolicy.from_pretrained("flowrl:toy", finetune_type="full").eval()
    sampler = RolloutSampler(policy)
    reward = ShapesReward(graded=True)
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    records, skipped = [], 0
    g = args.group_size
    for i, prompt in enumerate(prompts):
        batch = [prompt] * g
        gens = per_sample_generators(args.seed, g, i, 7001)
        out = sampler.sample(batch, args.resolution, args.resolution, args.steps, args.guidance_scale, gens)
        scores = reward(out.images, batch)
        best, worst = int(scores.argmax()), int(scores.argmin())
        if not scores[best] > scores[worst]:
            skipped += 1
            continue
        n = len(records)
        names = {"chosen": f"images/{n:04d}_chosen.png", "rejected": f"images/{n:04d}_rejected.png"}
        save_png(out.images[best], os.path.join(args.out, names["chosen"]))
        save_png(out.images[worst], os.path.join(args.out, names["rejected"]))
        records.append({"prompt": prompt, **names, "chosen_score": round(float(scores[best]), 4),
                        "rejected_score": round(float(scores[worst]), 4)})
    with open(os.path.join(args.out, "pairs.jsonl"), "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    print(f"{len(records)} pairs from {len(prompts)} prompts ({skipped} groups with equal scores skipped) "
          f"-> {args.out}")


if __name__ == "__main__":
    main()
