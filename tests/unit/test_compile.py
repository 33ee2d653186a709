"""``policy.compile`` (regional torch.compile of the denoiser's blocks) and ``policy.attention_backend`` (diffusers'
attention dispatcher): which calls run compiled and through which graph, the graph and recompile counts, copies
that stay eager, the one-line refusals, gradient checkpointing under compilation, and the benchmark's compile mode.

Tests marked ``compile`` run torch.compile (inductor): seconds each once its cache is warm, tens of seconds cold;
``-m "not compile"`` leaves them out. The on-policy ratio under compilation, per algorithm, is in
``tests/algorithms/test_compile_ratios.py``."""

from __future__ import annotations

import copy
import importlib.util
import json
import pickle
from pathlib import Path

import pytest
import torch
from tiny import checkpointing_gradients
from torch import nn

from flowrl.errors import ConfigError
from flowrl.policy import FlowMatchingPolicy, PolicyConfig
from flowrl.policy import attention as attention_module
from flowrl.policy import compile as compile_module
from flowrl.policy.compile import RegionalCompile, repeated_block_names

ROOT = Path(__file__).resolve().parents[2]


class Block(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, x):
        return x + torch.nn.functional.gelu(self.fc(self.norm(x)))


class Stack(nn.Module):
    """Two blocks of one class, declared as diffusers declares its transformers' blocks."""

    _no_split_modules = ["Block"]

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 8)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def stack_and_input(seed=0, rows=4):
    torch.manual_seed(seed)
    return Stack(), torch.randn(rows, 8)


# ------------------------------------------------------------------ refusals (no compilation)
def test_options_are_refused_in_one_line_before_loading():
    missing = "/nonexistent/model/folder"  # the path check comes later: nothing loads before these refusals
    with pytest.raises(ConfigError, match=r"^policy.compile='everything'; choose rollout .*, all .* or null \(eager\)$"):
        PolicyConfig(missing, compile="everything")
    with pytest.raises(ConfigError, match=r"^policy.attention_backend='flash' is not available on this machine .*"
                                          r"available here: \[.*'native'.*\], or null for torch's native SDPA$"):
        PolicyConfig(missing, attention_backend="flash")  # flash-attn on this CPU-only host
    with pytest.raises(ConfigError, match=r"^policy.attention_backend='fast' is not a diffusers attention backend; "
                                          r"choose one of \[.*'native'.*\]"):
        PolicyConfig(missing, attention_backend="fast")
    with pytest.raises(FileNotFoundError):
        PolicyConfig(missing, compile="all", attention_backend="native")  # both accepted: the path is next


def test_the_declared_repeated_blocks_are_found_or_refused():
    assert repeated_block_names(Stack()) == ["Block"]
    with pytest.raises(ConfigError, match=r"policy.compile: Sequential declares no repeated blocks to compile "
                                          r"\(_repeated_blocks / _no_split_modules: \[\]\); set policy.compile: null"):
        repeated_block_names(nn.Sequential(Block()))


def test_a_backend_is_refused_on_a_device_it_does_not_run_on():
    attention_module.check_attention_device("native", torch.device("cpu"))
    attention_module.check_attention_device("_native_flash", torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"policy.attention_backend='flash' runs on cuda only, but the denoiser is "
                                          r"on cpu; set policy.attention_backend: null .* or one of \[.*'native'"):
        attention_module.check_attention_device("flash", torch.device("cpu"))


# ------------------------------------------------------------------ attention backend (no compilation)
def flux_velocity(path, backend, cond_prompts=("a red circle", "two blue squares")):
    policy = FlowMatchingPolicy.from_pretrained(path, lora_rank=2, attention_backend=backend)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.normal_(0, 0.05)
        cond = policy.encode_prompt(list(cond_prompts))
        x = policy.prepare_latents(2, 16, 16, torch.Generator().manual_seed(0))
        return policy, policy.velocity(x, torch.tensor([0.8, 0.3]), cond, 3.5)


def test_native_backend_gives_identical_velocities_and_leaves_the_process_default(tiny_pipeline_path):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    path = tiny_pipeline_path("flux")  # FLUX's attention goes through diffusers' dispatcher
    default_before = _AttentionBackendRegistry.get_active_backend()[0]
    _, v_default = flux_velocity(path, None)
    policy, v_native = flux_velocity(path, "native")
    processors = [m.processor for m in policy.transformer.modules() if hasattr(m, "set_processor")]
    assert processors and all(p._attention_backend == "native" for p in processors)
    assert torch.equal(v_native, v_default)
    _, v_math = flux_velocity(path, "_native_math")  # another kernel really runs: same values to rounding
    torch.testing.assert_close(v_math, v_default, rtol=1e-4, atol=1e-5)
    assert _AttentionBackendRegistry.get_active_backend()[0] == default_before  # no process-wide side effect


def test_a_backend_the_model_would_ignore_is_refused(tiny_sd3_path):
    """SD3's processors call torch's SDPA directly: native is what they do, any other backend would do nothing."""
    FlowMatchingPolicy.from_pretrained(tiny_sd3_path, lora_rank=2, attention_backend="native")
    with pytest.raises(ConfigError, match=r"policy.attention_backend='_native_math' has no effect on "
                                          r"SD3Transformer2DModel: its attention processors \(JointAttnProcessor2_0\) "
                                          r"call torch's SDPA directly"):
        FlowMatchingPolicy.from_pretrained(tiny_sd3_path, lora_rank=2, attention_backend="_native_math")


# ------------------------------------------------------------------ which calls run compiled (tiny blocks)
def test_a_copy_of_a_compiled_block_runs_eagerly_on_its_own_weights():
    """A deepcopy (a distillation teacher copied from the policy) or a pickled copy must not call back into the
    original block."""
    stack, x = stack_and_input()
    RegionalCompile(stack, "all")
    assert all(b._compiled_call_impl is not None for b in stack.blocks)
    assert all(b._compiled_call_impl is None for b in pickle.loads(pickle.dumps(stack)).blocks)
    twin = copy.deepcopy(stack)
    assert all(b._compiled_call_impl is None for b in twin.blocks)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.1)
    plain = Stack()
    plain.load_state_dict(twin.state_dict())
    assert torch.equal(twin(x), plain(x))


@pytest.mark.compile
def test_rollout_mode_compiles_the_untrained_steps_only():
    stack, x = stack_and_input()
    eager = stack(x).detach()
    rc = RegionalCompile(stack, "rollout")
    with torch.no_grad():
        trained = rc(lambda: stack(x), inference=False)  # a step training recomputes: eager, bit for bit
    assert torch.equal(trained, eager) and rc.graphs == 0
    training = rc(lambda: stack(x), inference=False)  # the update's forward: eager, with its graph
    assert training.requires_grad and torch.equal(training.detach(), eager) and rc.graphs == 0
    with torch.no_grad():
        untrained = rc(lambda: stack(x), inference=True)
        assert rc.graphs == 1 and rc.recompiles == 0
        torch.testing.assert_close(untrained, eager)
        rc(lambda: stack(x), inference=True)  # the same shape: no new graph
        assert rc.graphs == 1
        rc(lambda: stack(torch.cat([x, x])), inference=True)  # a new shape: one recompile, counted
    stats = rc.stats()
    assert stats["perf/compiled_graphs"] == 2 and stats["perf/recompiles"] == 1 and stats["perf/compile_seconds"] > 0


@pytest.mark.compile
def test_all_mode_runs_a_recomputed_call_through_the_training_graph():
    stack, x = stack_and_input()
    rc = RegionalCompile(stack, "all")
    with torch.no_grad():  # the rollout's trained step: the training graphs, their autograd graph dropped
        rollout = rc(lambda: stack(x), inference=False)
    # two: the second block's input requires grad (the first block's output), the first one's does not
    training_graphs = rc.graphs
    assert not rollout.requires_grad and training_graphs == 2
    update = rc(lambda: stack(x), inference=False)  # the update's forward reuses those very graphs
    assert update.requires_grad and rc.graphs == training_graphs
    assert torch.equal(update.detach(), rollout)
    update.sum().backward()
    assert all(p.grad is not None for p in stack.blocks.parameters())
    with torch.no_grad():
        rc(lambda: stack(x), inference=True)  # an untrained step: its own inference graph (one for both blocks)
    assert rc.graphs == training_graphs + 1 and rc.recompiles == 1


@pytest.mark.compile
def test_all_mode_refuses_to_run_past_its_graph_limit(monkeypatch):
    """Past the limit dynamo would run new shapes eagerly, and the rollout and the update could then differ."""
    monkeypatch.setattr(compile_module, "_RECOMPILE_LIMIT", 2)
    stack, x = stack_and_input()
    rc = RegionalCompile(stack, "all")
    rc(lambda: stack(x), inference=False)  # the two training graphs
    with pytest.raises(RuntimeError, match=r"policy.compile: all needs more than 2 graphs of Block .*; use "
                                           r"policy.compile: rollout"):
        rc(lambda: stack(torch.cat([x, x])), inference=False)


# ------------------------------------------------------------------ the real denoiser
@pytest.mark.compile
def test_gradient_checkpointing_composes_with_compilation(tiny_sd3_path):
    """The checkpointed blocks run the compiled graph (recomputed in the backward): the LoRA gradients equal those
    without checkpointing bit for bit, and eager ones to rounding."""
    off, on, calls = checkpointing_gradients(tiny_sd3_path, "lora", 3.0, compile="all")
    eager, _, _ = checkpointing_gradients(tiny_sd3_path, "lora", 3.0)
    assert calls > 0 and off.keys() == on.keys() == eager.keys() and off
    for name in off:
        assert torch.equal(on[name], off[name]), name
        torch.testing.assert_close(off[name], eager[name], rtol=1e-3, atol=1e-6, msg=name)


# ------------------------------------------------------------------ the benchmark's compile mode
def _load_overhead():
    spec = importlib.util.spec_from_file_location("overhead", ROOT / "benchmarks" / "overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.compile
def test_overhead_benchmark_compile_mode_smoke(tmp_path):
    """grpo on the tiny SD3 with T5, eager and ``compile: rollout``, one measured iteration each: paired records
    with the fields the JSON must hold, the compile time and the break-even estimate."""
    bench = _load_overhead()
    small = ["--extra=--model.num_inference_steps=3", "--extra=--model.group_size=2", "--extra=--data.batch_size=2",
             "--extra=--model.train_batch_size=2", "--extra=--model.resolution=32", "--extra=--model.eval.resolution=32"]
    out = bench.main_(["--iterations", "1", "--setups", "sd3_t5", "--algorithms", "grpo", "--precisions", "32-true",
                       "--compile", "rollout", "--out", str(tmp_path / "overhead.json"), *small])
    eager, compiled = out["results"]
    for r in (eager, compiled):
        assert {"algorithm", "setup", "compiled", "cpu", "ratio_to_eager_floor"} <= set(r)
        assert r["algorithm"] == "grpo" and r["setup"] == "sd3_t5" and r["cpu"]["capability"]
        assert r["ratio_to_eager_floor"] == pytest.approx(r["seconds_per_iteration"] / r["eager_floor_seconds"])
    assert eager["compiled"] is False and eager["compile_mode"] is None and eager["compile_seconds"] == 0
    assert compiled["compiled"] is True and compiled["compile_mode"] == "rollout"
    assert compiled["compile_seconds"] > 0 and compiled["compiled_graphs"] >= 1
    assert compiled["recompiles_after_warmup"] == 0  # every shape of the measured iteration was compiled before it
    assert "break_even_iterations" in compiled
    saved = json.loads((tmp_path / "overhead.json").read_text())
    assert [r["compiled"] for r in saved["results"]] == [False, True]
    assert (tmp_path / "overhead.png").stat().st_size > 0
    # the Markdown table of the saved records (--table): one row, the eager run beside the compiled one
    md = bench.table(saved["results"])
    assert md.splitlines()[0].startswith("| setup | algorithm | precision | eager floor s | eager s/it (ratio) | rollout")
    row = md.splitlines()[2]
    assert row.startswith("| sd3_t5 | grpo | 32-true | ") and f"(**{compiled['ratio_to_eager_floor']:.3f}**)" in row
    assert bench.main_(["--table", "--out", str(tmp_path / "overhead.json")]) == saved
