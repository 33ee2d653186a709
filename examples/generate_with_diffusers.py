"""A LoRA exported by ``flowrl export``, in a stock diffusers pipeline: no flowrl code in the loop.

    flowrl export --ckpt_path runs/toy-lora/checkpoints/last.ckpt --config runs/toy-lora/logs/version_0/config.yaml --out exported/
    python examples/generate_with_diffusers.py exported/ "a red circle" out.png

``flowrl_export.json`` beside the weights names the base model and the arguments that make the pipeline condition
as training did (``call_kwargs``: the toy SD3 has no T5, so ``max_sequence_length=0``).
"""

import json
import os
import sys

import torch
from diffusers import DiffusionPipeline


def generate(export_dir: str, prompts: list[str], seed: int = 0, **kwargs):
    info = json.load(open(os.path.join(export_dir, "flowrl_export.json")))
    base = info["base_model"]  # the base's local folder or hub id
    index = DiffusionPipeline.load_config(base)
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}  # e.g. no T5
    pipe = DiffusionPipeline.from_pretrained(base, **absent)
    pipe.load_lora_weights(export_dir)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(prompt=prompts, generator=generators, **info["call_kwargs"], **kwargs).images  # PIL images


if __name__ == "__main__":
    export_dir, prompt, out = sys.argv[1:4]
    generate(export_dir, [prompt], num_inference_steps=20, guidance_scale=4.5)[0].save(out)
    print(f"wrote {out}")
