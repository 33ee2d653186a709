"""The on-policy ratio of the first update stays exactly 1 with ``policy.compile`` on, for every algorithm that has a
ratio: GRPO, GRPO-Guard, Flow-DPPO (the log-prob ratio of the trained SDE steps), AWM (its surrogate ratio) and DGPO
(its DSM ratio ``exp(old_dsm - dsm)``: the training velocity equals the frozen old one bit for bit). Under
``compile: all`` a trained step runs the same compiled training graph in the rollout and in the update; under
``compile: rollout`` it runs eagerly in both while the untrained steps run compiled. Also: bf16 autocast, FSDP2, and
a fit that logs ``perf/*`` with no recompilation in its second iteration.

All are marked ``compile`` (``-m "not compile"`` leaves them out): seconds each once inductor's cache is warm."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from tiny import assert_on_policy_ratios_are_one, make_module, randomize_lora

from flowrl.algorithms import AWM, DGPO, GRPO, FlowDPPO, GRPOGuard
from flowrl.data import PromptDataModule
from flowrl.policy import PolicyConfig
from flowrl.policy.sharding import FullyShard

pytestmark = pytest.mark.compile

PROMPTS = ["a red circle"] * 2 + ["two blue squares"] * 2
ADV = torch.tensor([1.0, -1.0, 0.5, -0.5])

COUPLED = {
    "grpo": (GRPO, {"clip_range": 1e-2}),
    "grpo-guard": (GRPOGuard, {"dynamics_type": "Flow-SDE", "noise_level": 0.7}),
    "dppo": (FlowDPPO, {}),
    "awm": (AWM, {"time_sampling_strategy": "uniform", "num_train_timesteps": 2}),
}


def compiled_module(cls, path, mode="all", finetune_type="lora", **kw):
    config = PolicyConfig(path, finetune_type=finetune_type, lora_rank=4, compile=mode,
                          **kw.pop("policy_options", {}))
    module = make_module(cls, path, finetune_type=finetune_type, policy=config, **kw)
    if finetune_type == "lora":
        randomize_lora(module)  # a non-zero LoRA: the check is not about the base weights
    return module


@pytest.mark.parametrize("name", list(COUPLED))
def test_first_update_ratio_is_exactly_one_with_everything_compiled(tiny_sd3_path, name):
    cls, options = COUPLED[name]
    module = compiled_module(cls, tiny_sd3_path, **options)
    rollout = module.rollout(PROMPTS)
    assert_on_policy_ratios_are_one(module, rollout, ADV)
    assert module.policy.compiled.graphs >= 2  # inference graphs (untrained steps) and training graphs both ran


def test_dgpo_training_velocity_is_the_old_one_bit_for_bit_with_everything_compiled(tiny_sd3_path):
    module = compiled_module(DGPO, tiny_sd3_path, num_train_timesteps=2, train_batch_size=4)
    rollout = module.rollout(PROMPTS)
    units = module.training_units(rollout)
    idx = torch.arange(4)
    for k in units:
        _, v, _, _ = module.group_velocity(rollout, idx, k)
        assert v.requires_grad and torch.equal(v.detach(), rollout.forward.v_old[k, idx])  # DSM ratio exactly 1
        assert module.training_loss(rollout, ADV, idx, k)["clip_fraction"] == 0


def test_rollout_mode_compiles_the_untrained_steps_and_keeps_trained_ones_eager(tiny_sd3_path):
    module = compiled_module(GRPO, tiny_sd3_path, mode="rollout", train_steps=[1], num_train_steps=1)
    rollout = module.rollout(PROMPTS)
    assert module.policy.compiled.graphs == 1  # the ODE steps' inference graph only
    assert_on_policy_ratios_are_one(module, rollout, ADV)
    assert module.policy.compiled.graphs == 1  # the update ran eagerly


def test_bf16_autocast_base_keeps_the_ratio_exactly_one(tiny_sd3_path):
    module = compiled_module(GRPO, tiny_sd3_path, clip_range=1e-2, policy_options={"frozen_dtype": "bfloat16"})
    assert module.policy.base_dtype == torch.bfloat16
    rollout = module.rollout(PROMPTS)
    assert_on_policy_ratios_are_one(module, rollout, ADV)


def test_fsdp2_sharded_blocks_compile_and_keep_the_ratio_exactly_one(tiny_sd3_path, one_process_mesh):
    module = compiled_module(GRPO, tiny_sd3_path, finetune_type="full", clip_range=1e-2,
                             policy_options={"fsdp": FullyShard()})
    module.policy.shard(one_process_mesh)
    rollout = module.rollout(PROMPTS)
    assert_on_policy_ratios_are_one(module, rollout, ADV)


def test_fit_logs_compile_counters_and_compiles_nothing_in_its_second_iteration(tiny_sd3_path, prompt_file):
    """Two iterations (2 optimizer steps each): the first update's ratio deviation is logged as 0, and every graph
    the second iteration needs was compiled in the first."""
    module = compiled_module(GRPO, tiny_sd3_path, clip_range=1e-2)
    graphs = []

    class Count(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            graphs.append(pl_module.policy.compiled.graphs)

    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, use_distributed_sampler=False, callbacks=[Count()])
    trainer.fit(module, datamodule=PromptDataModule(prompt_file, group_size=2, batch_size=4))
    assert module.iteration == 2 and len(graphs) == 2 and graphs[0] == graphs[1] > 0
    metrics = trainer.logged_metrics
    assert metrics["train/ratio_first_update_max_abs_dev"] == 0
    assert metrics["perf/compiled_graphs"] == graphs[1] and metrics["perf/recompiles"] == graphs[1] - 1
    assert metrics["perf/compile_seconds"] > 0
