"""The rollout's memory options (``latent_storage_dtype``, ``offload_rollout``): what each stores, and the exactness
each keeps (the first update's on-policy ratios exactly 1), against the plain float32 rollout."""

import copy

import pytest
import torch
from tiny import assert_on_policy_ratios_are_one, fit_one_iteration, make_module, randomize_lora

from flowrl.algorithms import GRPO, NFT, FlowDPPO, GRPOGuard
from flowrl.errors import ConfigError
from flowrl.rollout import RolloutStorage, StoredTensor

PROMPTS = ["a red circle"] * 2 + ["two blue squares"] * 2
ADV = torch.tensor([1.0, -1.0, 0.5, -0.5])
STORED = ("latents", "next_latents", "log_probs", "means", "v_uncond", "final")


def _module(cls, path, **options):
    torch.manual_seed(0)
    module = make_module(cls, path, **options)
    randomize_lora(module)  # the live model differs from the base: every weight takes part
    return module


def _first_ratios(module, rollout) -> torch.Tensor:
    """Every ratio of the first update (each micro-batch, each trained step), before any optimizer step."""
    n, ratios = len(rollout.prompts), []
    for sl in module.sampler.chunks(n):
        for k in module.training_units(rollout):
            ratios.append(module.training_loss(rollout, ADV, torch.arange(n)[sl], k)["ratio"])
    return torch.cat(ratios)


@pytest.mark.parametrize("cls", [GRPO, GRPOGuard, FlowDPPO])
def test_offload_moves_bytes_only(tiny_sd3_path, cls):
    """Every stored tensor goes to host memory and reads back as the plain rollout's tensor, bit for bit; the
    first ratios are exactly 1 (GRPO-Guard and DPPO also read the stored step means)."""
    plain = _module(cls, tiny_sd3_path).rollout(PROMPTS)
    module = _module(cls, tiny_sd3_path, offload_rollout=True)
    rollout = module.rollout(PROMPTS)
    for name in STORED:
        stored, want = getattr(rollout, name), getattr(plain, name)
        if want is None:
            assert stored is None, name
            continue
        assert isinstance(stored, StoredTensor) and stored.data.device.type == "cpu", name
        assert stored.data.dtype == want.dtype and torch.equal(stored.materialize(), want), name
        assert torch.equal(stored[torch.tensor([3, 1]), 0], want[torch.tensor([3, 1]), 0]), name
    assert torch.equal(rollout.images, plain.images)
    assert_on_policy_ratios_are_one(module, rollout, ADV)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("cls", [GRPO, GRPOGuard])
def test_low_precision_latents_keep_the_first_ratios_exactly_one(tiny_sd3_path, cls, dtype):
    """The trained steps' inputs and samples are held in ``dtype`` (half the bytes); since the rollout rounded
    them where it made them, training recomputes the rollout's log-probs bit for bit. The means (GRPO-Guard's
    ratio reads them) and the log-probs stay float32."""
    plain = _module(cls, tiny_sd3_path).rollout(PROMPTS)
    module = _module(cls, tiny_sd3_path, latent_storage_dtype=dtype)
    rollout = module.rollout(PROMPTS)
    for name in ("latents", "next_latents"):
        stored = getattr(rollout, name)
        assert stored.data.dtype == getattr(torch, dtype) and stored.shape == getattr(plain, name).shape
        assert stored.nbytes * 2 == getattr(plain, name).numel() * 4
        assert stored[:, 0].dtype == torch.float32
    assert rollout.log_probs.data.dtype == torch.float32
    assert rollout.means is None or rollout.means.data.dtype == torch.float32
    # each trained step starts where the previous one's stored sample left it
    assert torch.equal(rollout.latents[:, 1:].float(), rollout.next_latents[:, :-1].float())
    assert_on_policy_ratios_are_one(module, rollout, ADV)


def test_rounding_after_sampling_would_move_the_first_ratio(tiny_sd3_path):
    """Why the rollout rounds as it goes: the plain rollout's latents rounded afterwards give training other
    inputs and samples than the ones scored, and the first ratios leave 1 (by about 2e-4 in bfloat16 on this
    tiny SD3). Rounding during the rollout moves the sampled trajectory instead, by a rounding's size."""
    module = _module(GRPO, tiny_sd3_path)
    plain = module.rollout(PROMPTS)
    afterwards = copy.copy(plain)
    afterwards.latents = plain.latents.to(torch.bfloat16).float()
    afterwards.next_latents = plain.next_latents.to(torch.bfloat16).float()
    deviation = (_first_ratios(module, afterwards) - 1).abs().max().item()
    assert 1e-6 < deviation < 1e-2
    rounded = _module(GRPO, tiny_sd3_path, latent_storage_dtype="bfloat16").rollout(PROMPTS)
    moved = (rounded.final.materialize() - plain.final).abs().max().item()
    assert 0 < moved < 0.02 * plain.final.abs().max().item()


def test_wide_untrained_batches_and_the_kept_uncond_branch_with_both_options(tiny_sd3_path):
    """The step-by-step path (``rollout_batch_size``) and the reused unconditional branch under both options."""
    from flowrl.policy import PolicyConfig

    policy = PolicyConfig(tiny_sd3_path, lora_rank=4, uncond_gradient=False)
    module = _module(GRPO, tiny_sd3_path, policy=policy, rollout_batch_size=4, latent_storage_dtype="bfloat16",
                     offload_rollout=True, train_steps=[0, 2])
    rollout = module.rollout(PROMPTS)
    assert rollout.train_steps == [0, 2] and isinstance(rollout.v_uncond, StoredTensor)
    assert rollout.latents.data.dtype == torch.bfloat16 and rollout.latents.data.device.type == "cpu"
    assert_on_policy_ratios_are_one(module, rollout, ADV)


def test_a_training_iteration_with_both_options_logs_a_first_ratio_of_exactly_one(tiny_sd3_path, prompt_file):
    module = _module(GRPO, tiny_sd3_path, latent_storage_dtype="bfloat16", offload_rollout=True)
    metrics = fit_one_iteration(module, prompt_file).logged_metrics
    assert float(metrics["train/ratio_first_update_max_abs_dev"]) == 0.0
    assert module.hparams["latent_storage_dtype"] == "bfloat16" and module.hparams["offload_rollout"] is True


def test_offload_under_a_decoupled_algorithm_gives_the_plain_loss(tiny_sd3_path):
    """NFT stores only the final latents: offloaded, its training data and loss are the plain run's bit for bit."""
    losses = []
    for options in ({}, {"offload_rollout": True}):
        module = _module(NFT, tiny_sd3_path, num_train_timesteps=2, **options)
        rollout = module.rollout(PROMPTS)
        assert isinstance(rollout.final, StoredTensor) == bool(options)
        units = module.training_units(rollout)
        losses.append(torch.stack([module.training_loss(rollout, ADV, torch.arange(2), k)["loss"] for k in units]))
    assert torch.equal(losses[0], losses[1])


def test_bad_memory_options_fail_at_construction_in_one_line(tiny_sd3_path):
    with pytest.raises(ConfigError, match=r"latent_storage_dtype='fp16'; choose one of float32, bfloat16, float16"):
        make_module(GRPO, tiny_sd3_path, latent_storage_dtype="fp16")
    with pytest.raises(ConfigError, match=r"does nothing for trainer_type 'nft'.*remove it"):
        make_module(NFT, tiny_sd3_path, latent_storage_dtype="bfloat16")
    with pytest.raises(ConfigError, match=r"offload_rollout='yes'; set true or false"):
        RolloutStorage(offload="yes")


def test_a_stored_tensor_reads_like_the_tensor_it_holds():
    data = torch.randn(4, 3, 2, 5)
    stored = StoredTensor(data.to(torch.bfloat16), "cpu")
    want = data.to(torch.bfloat16).float()
    assert stored.shape == data.shape and stored.ndim == 4 and len(stored) == 4 and stored.size(1) == 3
    assert stored.dtype == torch.float32 and stored.device == torch.device("cpu")
    for index in [(torch.tensor([2, 0]), 1), (slice(1, 3), 0), torch.tensor([3]), (0, 2), ...]:
        got = stored[index]
        assert got.dtype == torch.float32 and torch.equal(got, want[index])
    assert stored.nbytes == data.numel() * 2
