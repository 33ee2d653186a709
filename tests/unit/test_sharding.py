"""FSDP2's options on the policy (``policy.fsdp``): bf16 all-gathers keep on-policy ratios exactly 1 and float32
master weights and gradients; CPU offload and gradient checkpointing compose with the sharding; bad values are
refused by name."""

import pytest
import torch
from tiny import assert_on_policy_ratios_are_one, assert_same_gradients, make_module
from torch.distributed.tensor import DTensor

from flowrl.algorithms import GRPO
from flowrl.errors import ConfigError
from flowrl.policy import PolicyConfig
from flowrl.policy.sharding import FullyShard

PROMPTS = ["a red circle"] * 2 + ["two blue squares"] * 2
ADV = torch.tensor([1.0, -1.0, 0.5, -0.5])


def sharded_module(path, mesh, fsdp, **policy):
    config = PolicyConfig(path, finetune_type="full", fsdp=fsdp, **policy)
    module = make_module(GRPO, path, policy=config, clip_range=1e-2)
    module.policy.shard(mesh)
    return module


def gradients(module, rollout):
    module.training_loss(rollout, ADV, torch.arange(4), 0)["loss"].backward()
    return {n: p.grad.full_tensor() for n, p in module.policy.named_trainable_parameters()}


def test_bf16_all_gathers_keep_ratios_of_one_and_float32_master_weights(tiny_sd3_path, one_process_mesh):
    module = sharded_module(tiny_sd3_path, one_process_mesh, FullyShard(param_dtype="bfloat16"))
    rollout = module.rollout(PROMPTS)
    assert_on_policy_ratios_are_one(module, rollout, ADV)  # the rollout and the update gather the same bf16 values
    grads = gradients(module, rollout)
    assert all(p.dtype == torch.float32 and isinstance(p, DTensor) for p in module.policy.trainable_parameters())
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("option", ["cpu_offload", "gradient_checkpointing", "keep_gathered"])
def test_offload_checkpointing_and_no_reshard_give_the_plain_sharded_gradients(tiny_sd3_path, one_process_mesh, option):
    plain = sharded_module(tiny_sd3_path, one_process_mesh, FullyShard())
    fsdp = FullyShard(cpu_offload=option == "cpu_offload", reshard_after_forward=option != "keep_gathered")
    other = sharded_module(tiny_sd3_path, one_process_mesh, fsdp,
                           **({"gradient_checkpointing": True} if option == "gradient_checkpointing" else {}))
    rollouts = [m.rollout(PROMPTS) for m in (plain, other)]
    assert torch.equal(rollouts[0].latents, rollouts[1].latents)
    assert_on_policy_ratios_are_one(other, rollouts[1], ADV)
    assert_same_gradients(gradients(plain, rollouts[0]), gradients(other, rollouts[1]))


@pytest.mark.parametrize("field, value", [("param_dtype", "bf16"), ("reduce_dtype", "float64")])
def test_a_dtype_that_is_not_one_is_refused_by_name(field, value):
    with pytest.raises(ConfigError, match=f"policy.fsdp.{field}='{value}'; choose float32, bfloat16, float16 or null"):
        FullyShard(**{field: value})
