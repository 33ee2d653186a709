"""Lean loading: the frozen components (and a LoRA run's transformer base) load straight in ``frozen_dtype``
(diffusers' per-component ``dtype``), and the policy is today's load-then-cast bit for bit, with less memory."""

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from flowrl.policy import FlowMatchingPolicy, PolicyConfig
from flowrl.policy.policy import _load_pipeline, load_dtypes

ROOT = Path(__file__).resolve().parents[2]
WAN = {"num_frames": 5, "max_sequence_length": 16}


def _float32_then_cast(config: PolicyConfig) -> FlowMatchingPolicy:
    """The policy as it was built before lean loading: every component loaded in float32, then cast."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(config.pretrained_model_name_or_path)
    none = {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}
    pipeline = DiffusionPipeline.from_pretrained(config.pretrained_model_name_or_path, **none)
    kwargs = {k: getattr(config, k) for k in ("finetune_type", "lora_rank", "frozen_dtype", "num_frames",
                                              "max_sequence_length")}
    return FlowMatchingPolicy(pipeline, **kwargs)


def _tensors(policy) -> dict[str, torch.Tensor]:
    return dict(policy.named_parameters()) | dict(policy.named_buffers())


@pytest.mark.parametrize("frozen_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("finetune_type", ["lora", "full"])
@pytest.mark.parametrize("family", ["sd3", "wan"])  # Wan keeps norms and modulation tables in float32
def test_lean_loading_gives_todays_policy_bit_for_bit(tiny_pipeline_path, family, finetune_type, frozen_dtype):
    config = PolicyConfig(tiny_pipeline_path(family), finetune_type=finetune_type, lora_rank=2,
                          frozen_dtype=frozen_dtype, **(WAN if family == "wan" else {}))
    torch.manual_seed(0)  # the LoRA adapters' initialisation
    old = _float32_then_cast(config)
    torch.manual_seed(0)
    new = FlowMatchingPolicy.from_config(config)
    want, got = _tensors(old), _tensors(new)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    velocities = []
    # bf16 frozen parts compute under bf16 autocast, as the Trainer's bf16-mixed runs them (a float32 transformer
    # fed a bf16 text encoder's output needs it, with either load)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=frozen_dtype == "bfloat16")
    for policy in (old, new):
        torch.manual_seed(1)
        with torch.no_grad(), autocast:
            if finetune_type == "lora":  # a non-zero LoRA: the adapters take part
                for p in policy.trainable_parameters():
                    p.add_(0.05 * torch.randn_like(p))
            cond = policy.encode_prompt(["a red circle", "two blue squares"])
            x = policy.prepare_latents(2, 16, 16, torch.Generator().manual_seed(0))
            velocities.append(policy.velocity(x, torch.tensor([0.9, 0.4]), cond, guidance_scale=3.0))
    assert torch.equal(velocities[0], velocities[1])


def test_each_component_loads_in_its_training_dtype(tiny_pipeline_path):
    """No weight passes through float32 on its way to bf16: the frozen parts (and, under LoRA, the transformer
    base, but for the modules diffusers keeps in float32) arrive in bf16; a fully trained transformer in float32."""
    path = tiny_pipeline_path("wan")
    assert load_dtypes(PolicyConfig(path, frozen_dtype="float32"), "WanPipeline") is None  # the plain call
    assert load_dtypes(PolicyConfig(path, frozen_dtype="bfloat16"), "WanPipeline") == {
        "default": torch.bfloat16, "vae": torch.bfloat16, "text_encoder": torch.bfloat16}
    assert load_dtypes(PolicyConfig(path, finetune_type="full", frozen_dtype="float16"), "WanPipeline") == {
        "default": torch.float32, "vae": torch.float16, "text_encoder": torch.float16}
    lora = _load_pipeline(PolicyConfig(path, frozen_dtype="bfloat16", **WAN))
    keep = lora.transformer._keep_in_fp32_modules
    for name, p in lora.transformer.named_parameters():
        assert p.dtype == (torch.float32 if any(k in name for k in keep) else torch.bfloat16), name
    full = _load_pipeline(PolicyConfig(path, finetune_type="full", frozen_dtype="bfloat16", **WAN))
    assert {p.dtype for p in full.transformer.parameters()} == {torch.float32}
    for pipeline in (lora, full):
        assert {p.dtype for n in ("vae", "text_encoder") for p in getattr(pipeline, n).parameters()} == {torch.bfloat16}


_CHILD = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("memory", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
rows = [bench.measure_load(sys.argv[2], "lora", "bfloat16", lean, sys.argv[3], lora_rank=4) for lean in (True, False)]
print(json.dumps(rows))
"""


def test_peak_memory_at_load_is_at_most_1_2_times_the_weights(tmp_path, tiny_sd3_path):
    """In a fresh process, building a LoRA policy with a bf16 base from a pipeline saved in bf16 (as the hub ships
    SD3.5 and FLUX) raises the peak resident memory by at most 1.2x the bytes of its weights in their training
    dtypes, every weight's pages read; the float32 load that was cast afterwards peaked at over 2x."""
    spec = importlib.util.spec_from_file_location("memory", ROOT / "benchmarks" / "memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = tmp_path / "sd3"
    bench.build(path, layers=4, width=384, dtype="bfloat16")  # a 21M-parameter transformer: 42 MB in bf16
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(_CHILD), str(ROOT / "benchmarks" / "memory.py"),
                          str(path), tiny_sd3_path], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    lean, old = json.loads(out.splitlines()[-1])
    assert lean["weights_mib"] == old["weights_mib"] > 40
    assert lean["ratio"] <= 1.2, lean
    assert old["ratio"] > 2.0, old
