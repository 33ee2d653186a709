"""Where every second of an iteration goes, against the raw floor of the same transformer calls.

For grpo, nft and awm on the toy model and on a tiny SD3 pipeline with a T5 encoder (CLIP 77 + T5 256 = 333
text tokens, as SD3.5 uses), each run for ``--iterations`` measured iterations after one warm-up:

* the iteration's wall time split by phase, from the Trainer's profiler (``FlowRLModule.profile``: prompt
  encoding, sampling steps, decoding, reward, frozen velocities, training forwards, backwards, optimizer,
  logging; Lightning's own records for the EMA / off-policy callbacks), the rest as "other";
* the time spent in the transformer's forwards during the run (forward pre/post hooks; backwards not included);
* the raw floor: every transformer call of one measured iteration replayed in the same process on the same
  inputs (shapes, counts, grad mode and autocast as recorded; a backward through each call that had grad),
  nothing else;
* their ratio: each measured iteration over the replay made right after it (drift cancels), the median
  (target <= 1.05);
* the in-run ratio: each iteration over the time its own transformer forwards and backward passes took in it
  (no drift at all between the two; what the rest of the iteration costs on top of the model's compute).

Both precisions (32-true and bf16-mixed) where the CPU runs bf16 natively; the CPU is recorded beside every
number. Writes ``benchmarks/overhead.json`` and ``benchmarks/overhead.png``.

``--compile rollout all`` runs every configuration eagerly and then with each ``policy.compile`` mode
(:mod:`flowrl.policy.compile`). The floor stays the eager one: the eager run's transformer calls, replayed with
compilation switched off (``torch.compiler.set_stance("force_eager")``) right after each measured iteration of the
compiled run too, so ``ratio_to_eager_floor`` below 1 is what compilation gains over eager compute. A compiled
record also holds its compile time (torch's account, forward and backward graphs, warm-up included), the graphs
compiled during the measured iterations (0 once every shape is compiled) and ``break_even_iterations``: the compile
time over the seconds an iteration saves against the eager run of the same configuration, from the paired ratios
(null: it saves none).

    python benchmarks/overhead.py [--iterations 3] [--setups toy sd3_t5] [--algorithms grpo nft awm]
                                  [--compile rollout all]
    python benchmarks/overhead.py --table [--out benchmarks/overhead.json]   # the records as a Markdown table
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flowrl.precision import cpu_description  # noqa: E402

TOY = ROOT / "lightning_configs" / "toy"
PHASES = ["encode_prompt", "sampling_steps", "decode", "reward", "advantages", "frozen_velocities",
          "train_forward", "backward", "optimizer", "logging", "callbacks", "other"]
PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow circle",
           "three red squares"]


def build_tiny_sd3_with_t5(path: Path) -> None:
    """A tiny SD3 pipeline with two CLIP encoders (77 tokens) and a tiny T5 (256 tokens), saved to ``path``; its
    positional table reaches 128 px (the scaling sweep), the runs use 64 px."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    from flowrl.policy.tiny.text import build_t5_tokenizer
    from flowrl.toy.pipeline import build_tiny_sd3_pipeline

    base = build_tiny_sd3_pipeline(seed=0, sample_size=128, num_layers=2, attention_head_dim=32, vae_channels=8,
                                   vae_downsample=2,
                                   max_text_length=77)
    torch.manual_seed(1)
    t5 = T5EncoderModel(T5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4))
    components = {**base.components, "text_encoder_3": t5, "tokenizer_3": build_t5_tokenizer(model_max_length=256)}
    StableDiffusion3Pipeline(**components).save_pretrained(path)


def setup_args(setup: str, tiny_path: Path | None) -> list[str]:
    """Command-line overrides of one setup: 16 samples an iteration (groups of 8), 10 steps, one optimizer step."""
    args = ["--trainer.max_steps=1000", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            "--trainer.profiler=simple", "--model.group_size=8", "--data.batch_size=16",
            "--model.train_batch_size=16", "--model.gradient_accumulation_steps=1", "--model.num_inference_steps=10",
            "--data.train_prompts=[" + ", ".join(repr(p) for p in PROMPTS) + "]"]
    if setup == "sd3_t5":
        args += [f"--model.policy.pretrained_model_name_or_path={tiny_path}", "--model.policy.finetune_type=lora",
                 "--model.policy.lora_rank=8", "--model.resolution=64", "--model.eval.resolution=64",
                 "--model.rewards=[{name: jpeg_compressibility}]"]
    return args


class Recorder:
    """Times every transformer call and, while ``capture`` is on, keeps its inputs for the replay."""

    def __init__(self, transformer):
        self.inside = 0.0
        self.capture = False
        self.replaying = False  # the floor replays: not part of the run's time
        self.calls: list[dict] = []
        self._start = None
        transformer.register_forward_pre_hook(self._pre, with_kwargs=True)
        transformer.register_forward_hook(self._post, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        self._start = time.perf_counter()
        if self.capture:
            kw = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            autocast = torch.is_autocast_enabled("cpu")
            self.calls.append({"kwargs": kw, "grad": torch.is_grad_enabled(),
                               "autocast": torch.get_autocast_dtype("cpu") if autocast else None})

    def _post(self, module, args, kwargs, output):
        if not self.replaying:
            self.inside += time.perf_counter() - self._start


class IterationClock:
    """A Lightning callback: clears the profiler after the warm-up iterations, times each measured iteration and,
    right after it, one replay of the transformer calls recorded in the first measured one. Each iteration is
    compared with the replay next to it in time, so the machine's drift cancels in their ratio."""

    def __init__(self, recorder: Recorder, warmup: int, iterations: int, floor_calls: list[dict] | None = None):
        import lightning as L

        class _Clock(L.Callback):  # counts iterations itself: an epoch of the prompt list may hold few batches
            def on_train_batch_start(cb, trainer, pl_module, batch, batch_idx):
                if self.seen == warmup:
                    trainer.profiler.recorded_durations.clear()
                    recorder.inside = 0.0
                    self.graphs_at_start = pl_module.policy.compile_stats().get("perf/compiled_graphs", 0.0)
                self.inside_at_start = recorder.inside
                self.backward_at_start = sum(trainer.profiler.recorded_durations.get("[flowrl] backward", []))
                # the first measured iteration is the one replayed (a compiled run replays its eager twin's calls)
                recorder.capture = self.seen == warmup and floor_calls is None
                self.last = time.perf_counter()

            def on_train_batch_end(cb, trainer, pl_module, outputs, batch, batch_idx):
                now = time.perf_counter()
                measured, self.seen = self.seen >= warmup, self.seen + 1
                recorder.capture = False
                if not measured:
                    return
                self.times.append(now - self.last)
                backward = sum(trainer.profiler.recorded_durations.get("[flowrl] backward", [])) - self.backward_at_start
                self.in_run.append(recorder.inside - self.inside_at_start + backward)
                recorder.replaying = True
                self.replays.append(replay_floor(pl_module.policy.transformer, floor_calls or recorder.calls,
                                                 repeats=1))
                recorder.replaying = False
                if self.seen == warmup + iterations:
                    trainer.should_stop = True

        self.callback = _Clock()
        self.seen = 0
        self.graphs_at_start = 0.0  # graphs compiled before the first measured iteration
        self.last = None
        self.times: list[float] = []  # each measured iteration, batch start to batch end
        self.in_run: list[float] = []  # its own transformer forwards and backward passes
        self.replays: list[float] = []  # the replay right after each


def replay_floor(transformer, calls: list[dict], repeats: int = 5) -> float:
    """Seconds of the recorded transformer calls alone (the median of ``repeats`` replays), a backward through
    each call that had grad; eager even where the blocks are compiled (the floor is the eager compute)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for call in calls:
            with torch.set_grad_enabled(call["grad"]), torch.autocast(
                    "cpu", dtype=call["autocast"] or torch.bfloat16, enabled=call["autocast"] is not None), \
                    torch.compiler.set_stance("force_eager"):
                out = transformer(**call["kwargs"])
                out = out[0] if isinstance(out, tuple) else out.sample
                if call["grad"]:
                    out.float().sum().backward()
        times.append(time.perf_counter() - start)
    for p in transformer.parameters():
        p.grad = None
    return statistics.median(times)


def run(setup: str, algorithm: str, precision: str, iterations: int, tiny_path: Path | None,
        extra: tuple[str, ...] = (), compile_mode: str | None = None, floor_calls: list[dict] | None = None,
        calls_out: list[dict] | None = None) -> dict:
    """One configuration; ``compile_mode``: its ``policy.compile``; ``floor_calls``: the transformer calls to replay
    as the floor (an eager run's, which ``calls_out`` receives), else those of this run's first measured iteration."""
    from flowrl.cli import main

    args = ["--config", str(TOY / f"{algorithm}.yaml"), *setup_args(setup, tiny_path), f"--trainer.precision={precision}",
            *extra, *([f"--model.policy.compile={compile_mode}"] if compile_mode else [])]
    cli = main(args, run=False)
    module, trainer = cli.model, cli.trainer
    recorder = Recorder(module.policy.transformer)
    clock = IterationClock(recorder, warmup=1, iterations=iterations, floor_calls=floor_calls)
    trainer.callbacks.append(clock.callback)
    trainer.fit(module, datamodule=cli.datamodule)
    records = trainer.profiler.recorded_durations
    phases = defaultdict(float)
    for name, durations in records.items():
        if name.startswith("[flowrl] "):
            phases[name[len("[flowrl] "):]] += sum(durations)
        elif name.startswith("[Callback]") and "on_train_batch" in name and "_Clock" not in name:
            phases["callbacks"] += sum(durations)
    inside = recorder.inside
    callback_records = {k: round(sum(v) / iterations, 5) for k, v in records.items() if k.startswith("[Callback]")}
    per_it = {k: v / iterations for k, v in phases.items()}
    per_it["other"] = statistics.mean(clock.times) - sum(per_it.values())
    # the machine's speed drifts: each iteration against the replay next to it, and medians
    ratios = [t / f for t, f in zip(clock.times, clock.replays)]
    median, floor = statistics.median(clock.times), statistics.median(clock.replays)
    calls = floor_calls or recorder.calls
    if calls_out is not None:
        calls_out[:] = calls
    shapes = collections.Counter((tuple(c["kwargs"]["hidden_states"].shape), c["grad"]) for c in calls)
    stats = module.policy.compile_stats()
    return {
        "setup": setup, "algorithm": algorithm, "precision": precision, "iterations": iterations,
        "compiled": compile_mode is not None, "compile_mode": compile_mode, "cpu": cpu_description(),
        "compile_seconds": stats.get("perf/compile_seconds", 0.0),
        "compiled_graphs": int(stats.get("perf/compiled_graphs", 0)),
        "recompiles_after_warmup": int(stats.get("perf/compiled_graphs", 0) - clock.graphs_at_start),
        "call_shapes": {f"{list(k[0])} grad={k[1]}": v for k, v in shapes.items()},
        "seconds_per_iteration": median,
        "iteration_seconds": [round(t, 4) for t in clock.times],
        "floor_seconds": [round(t, 4) for t in clock.replays],
        "phases_per_iteration": {k: round(per_it.get(k, 0.0), 5) for k in PHASES},
        "transformer_forwards_in_run_per_iteration": inside / iterations,
        "callback_records": {k: v for k, v in callback_records.items() if v > 1e-4},
        "transformer_calls_per_iteration": len(calls),
        "floor_seconds_per_iteration": floor,
        "eager_floor_seconds": floor,  # (the floor is always eager: the same as floor_seconds_per_iteration)
        "ratio_to_floor": statistics.median(ratios),
        "ratio_to_eager_floor": statistics.median(ratios),
        "paired_ratios": [round(r, 3) for r in ratios],
        # drift-free: each iteration over the time its own transformer forwards and backwards took in it
        "ratio_to_in_run_compute": statistics.median(t / c for t, c in zip(clock.times, clock.in_run)),
        "transformer_parameters": sum(p.numel() for p in module.policy.transformer.parameters()),
    }


#: the scaling sweep (grpo on the tiny SD3 with T5, float32): one knob at a time from 16 samples, 64 px, 2 trained steps
SCALING = {
    "samples per iteration": ("samples", [8, 16, 32, 64]),
    "resolution (px)": ("resolution", [32, 64, 128]),
    "trained steps": ("train_steps", [1, 2, 4, 8]),
}


def scaling_args(knob: str, value: int) -> list[str]:
    if knob == "samples":
        return [f"--data.batch_size={value}", f"--model.train_batch_size={min(value, 16)}",
                f"--model.gradient_accumulation_steps={max(1, value // 16)}"]
    if knob == "resolution":
        return [f"--model.resolution={value}", f"--model.eval.resolution={value}"]
    return [f"--model.train_steps=[{', '.join(str(i) for i in range(value))}]"]


def run_scaling(iterations: int, tiny: Path) -> dict:
    sweep = {}
    for title, (knob, values) in SCALING.items():
        sweep[title] = []
        for value in values:
            r = run("sd3_t5", "grpo", "32-true", iterations, tiny, tuple(scaling_args(knob, value)))
            print(f"scaling {knob}={value}: {r['seconds_per_iteration']:.3f} s/it, floor "
                  f"{r['floor_seconds_per_iteration']:.3f} s", flush=True)
            sweep[title].append({"value": value, **{k: r[k] for k in ("seconds_per_iteration",
                                 "floor_seconds_per_iteration", "ratio_to_floor", "phases_per_iteration")}})
    return sweep


def plot_scaling(sweep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sweep), figsize=(4.2 * len(sweep), 3.6))
    for ax, (title, points) in zip(axes, sweep.items()):
        xs = [p["value"] for p in points]
        ax.plot(xs, [p["seconds_per_iteration"] for p in points], "o-", label="iteration")
        ax.plot(xs, [p["floor_seconds_per_iteration"] for p in points], "s--", label="transformer floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(title)
        ax.set_ylabel("seconds per iteration")
        ax.legend(fontsize=8)
    fig.suptitle("grpo, tiny SD3 + T5 (333 text tokens), float32; from 16 samples, 64 px, 2 trained steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(results)), 4.5))
    labels = [f"{r['setup']}\n{r['algorithm']}\n{r['precision']}" + (f"\n{r['compile_mode']}" if r.get("compiled")
              else "") for r in results]
    bottom = [0.0] * len(results)
    colors = plt.get_cmap("tab20").colors
    for j, phase in enumerate(PHASES):
        heights = [max(r["phases_per_iteration"][phase], 0.0) for r in results]
        ax.bar(range(len(results)), heights, bottom=bottom, label=phase, color=colors[j % len(colors)])
        bottom = [b + h for b, h in zip(bottom, heights)]
    for i, r in enumerate(results):
        ax.plot([i - 0.4, i + 0.4], [r["floor_seconds_per_iteration"]] * 2, color="black", lw=2)
        ax.text(i, bottom[i], f"{r['ratio_to_floor']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(results)), labels, fontsize=7)
    ax.set_ylabel("seconds per iteration")
    ax.set_title("per-phase time per iteration; black line: raw transformer floor; label: total / floor")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def break_even(eager: dict, compiled: dict) -> float | None:
    """Iterations after which ``compiled``'s compile time is paid back (None: it saves nothing). The seconds an
    iteration saves are read from the paired ratios (each run against the eager floor replayed next to it) times the
    eager run's floor, not from the two runs' raw times, which the machine's drift between runs moves by 10-20%."""
    saved = (eager["ratio_to_eager_floor"] - compiled["ratio_to_eager_floor"]) * eager["eager_floor_seconds"]
    return compiled["compile_seconds"] / saved if saved > 0 else None


def table(results: list[dict]) -> str:
    """The records as one Markdown row per setup, algorithm and precision: the eager run and each compiled mode,
    seconds per iteration and the paired ratio to the eager floor, with compile time and iterations to break even."""
    modes = sorted({r["compile_mode"] for r in results if r.get("compiled")}, key=["rollout", "all"].index)
    head = ["setup", "algorithm", "precision", "eager floor s", "eager s/it (ratio)"]
    head += [f"{m} s/it (ratio), compile s, break-even it" for m in modes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows: dict[tuple, dict] = {}
    for r in results:
        rows.setdefault((r["setup"], r["algorithm"], r["precision"]), {})[r.get("compile_mode")] = r
    for (setup, algorithm, precision), by_mode in rows.items():
        eager = by_mode.get(None)
        cells = [setup, algorithm, precision, f"{eager['eager_floor_seconds']:.3f}" if eager else "-",
                 f"{eager['seconds_per_iteration']:.3f} ({eager['ratio_to_eager_floor']:.3f})" if eager else "-"]
        for m in modes:
            r = by_mode.get(m)
            if r is None:
                cells.append("-")
                continue
            even = r.get("break_even_iterations")
            cells.append(f"{r['seconds_per_iteration']:.3f} (**{r['ratio_to_eager_floor']:.3f}**), "
                         f"{r['compile_seconds']:.1f}, {'never' if even is None else f'{even:.0f}'}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main_(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--setups", nargs="+", default=["toy", "sd3_t5"], choices=["toy", "sd3_t5"])
    parser.add_argument("--algorithms", nargs="+", default=["grpo", "nft", "awm"])
    parser.add_argument("--precisions", nargs="+", default=None,
                        help="default: 32-true, and bf16-mixed where the CPU has native bf16")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "overhead.json")
    parser.add_argument("--extra", action="append", default=[],
                        help="one more override for every run, as --extra=--model.num_inference_steps=4 (repeatable)")
    parser.add_argument("--compile", nargs="+", default=[], choices=["rollout", "all"],
                        help="also run every configuration with these policy.compile modes (after its eager run)")
    parser.add_argument("--table", action="store_true",
                        help="instead: print the Markdown table of the records already in --out")
    parser.add_argument("--scaling", action="store_true",
                        help="instead: the scaling sweep (samples, resolution, trained steps) -> overhead_scaling.json/png")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()  # the runs work in a temporary directory
    if args.table:
        saved = json.loads(args.out.read_text())
        print(table(saved["results"]))
        return saved
    cpu = cpu_description()
    precisions = args.precisions or (["32-true", "bf16-mixed"] if cpu["native_bf16"] else ["32-true"])
    results, cwd = [], os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return _measure(args, cpu, precisions, results, Path(tmp))
        finally:
            os.chdir(cwd)


def _measure(args, cpu, precisions, results, tmp: Path) -> dict:
    tiny = tmp / "tiny-sd3-t5"
    if "sd3_t5" in args.setups or args.scaling:
        build_tiny_sd3_with_t5(tiny)
    os.chdir(tmp)
    if args.scaling:
        out = {"cpu": cpu, "torch_threads": torch.get_num_threads(), "sweep": run_scaling(args.iterations, tiny)}
        path = args.out.with_name("overhead_scaling.json")
        path.write_text(json.dumps(out, indent=2) + "\n")
        plot_scaling(out["sweep"], path.with_suffix(".png"))
        return out
    for setup in args.setups:
        for algorithm in args.algorithms:
            for precision in precisions:
                calls: list[dict] = []
                eager = None
                for mode in [None, *args.compile]:
                    r = run(setup, algorithm, precision, args.iterations, tiny, tuple(args.extra), mode,
                            floor_calls=calls or None, calls_out=calls)
                    if mode is None:
                        eager = r
                    else:
                        r["break_even_iterations"] = break_even(eager, r)
                    print(f"{setup:7s} {algorithm:5s} {precision:10s} {mode or 'eager':7s} "
                          f"{r['seconds_per_iteration']:.3f} s/it, eager floor {r['eager_floor_seconds']:.3f} s, "
                          f"ratio {r['ratio_to_eager_floor']:.3f}, in-run ratio {r['ratio_to_in_run_compute']:.3f}"
                          + (f", compile {r['compile_seconds']:.1f} s" if mode else ""), flush=True)
                    results.append(r)
    out = {"cpu": cpu, "torch_threads": torch.get_num_threads(), "results": results}
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(table(results))
    return out


if __name__ == "__main__":
    main_()
