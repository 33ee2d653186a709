"""Make the toy world's two DiffusionOPD teachers (``flowrl/toy/teachers/``): LoRAs of the shipped toy model, each
trained by DiffusionNFT on a different reward, exported for stock diffusers (``pytorch_lora_weights.safetensors``).

* ``graded``: the shapes verifier's graded score (the fraction of the prompt's requirements met);
* ``strict``: the verifier's strict 0/1 correctness (a sparser reward: all or nothing).

Each is ``flowrl fit --config lightning_configs/toy/nft.yaml --config lightning_configs/toy/lora.yaml`` with its
reward, without validation, for ``--steps`` iterations (a multiple of the config's checkpoint interval, 25), then
``flowrl export --ema`` (the EMA weights, which NFT's validation uses). The export's record names the base by its
alias, ``flowrl:toy``, not this machine's folder. Deterministic for a given seed and CPU kind; about three minutes a
teacher on two cores.

    python scripts/make_toy_teachers.py                 # the shipped teachers
    python scripts/make_toy_teachers.py --out /tmp/teachers --steps 10
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from flowrl.toy import TOY_DIR  # noqa: E402

#: teacher name -> its reward (a ``model.rewards`` entry)
TEACHERS = {
    "graded": "[{name: shapes, args: {graded: true}}]",
    "strict": "[{name: shapes, args: {graded: false}}]",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(TOY_DIR / "teachers"), help="output folder (one sub-folder a teacher)")
    parser.add_argument("--steps", type=int, default=25,
                        help="training iterations of each teacher (a multiple of 25, nft.yaml's checkpoint interval)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=sorted(TEACHERS), help="make one teacher only")
    return parser.parse_args(argv)


def flowrl(*args: str, cwd: str) -> None:
    subprocess.run([sys.executable, "-m", "flowrl.cli", *args], cwd=cwd, check=True)


def make_teacher(name: str, reward: str, out: str, steps: int, seed: int) -> None:
    configs = [os.path.join(ROOT, "lightning_configs", "toy", f) for f in ("nft.yaml", "lora.yaml")]
    with tempfile.TemporaryDirectory() as work:
        flowrl("fit", *[a for c in configs for a in ("--config", c)],
               f"--model.rewards={reward}", f"--trainer.max_steps={steps}", f"--seed_everything={seed}",
               f"--model.seed={seed}", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
               "--trainer.precision=32-true", f"--trainer.default_root_dir={work}", cwd=work)
        ckpt = sorted(glob.glob(os.path.join(work, "**", "last.ckpt"), recursive=True))
        config = sorted(glob.glob(os.path.join(work, "**", "config.yaml"), recursive=True))
        if not ckpt or not config:
            raise RuntimeError(f"teacher {name}: the run wrote no last.ckpt / config.yaml under {work}")
        target = os.path.join(out, name)
        shutil.rmtree(target, ignore_errors=True)
        flowrl("export", "--ckpt_path", ckpt[-1], "--config", config[-1], "--out", target, "--ema", cwd=work)
    info_path = os.path.join(target, "flowrl_export.json")
    info = json.load(open(info_path, encoding="utf-8"))
    info.update(base_model="flowrl:toy", checkpoint=None, made_by="scripts/make_toy_teachers.py", reward=reward)
    with open(info_path, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, sort_keys=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.steps < 25 or args.steps % 25:
        raise SystemExit(f"--steps {args.steps}: give a multiple of 25 (nft.yaml saves its checkpoint every 25 steps)")
    for name, reward in TEACHERS.items():
        if args.only in (None, name):
            make_teacher(name, reward, args.out, args.steps, args.seed)
    print(f"teachers written to {args.out}")


if __name__ == "__main__":
    main()
