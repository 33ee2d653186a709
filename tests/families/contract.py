"""The contract every model family keeps, as diffusers' ``PipelineTesterMixin`` does it: a family's test file
declares ``class Test<Family>Contract(FamilyContract)`` with its tiny pipeline and settings (``family``,
``guidance``, ...), and these tests run on it. A family's own file keeps only what is special to it (loading and
conditioning, sampling equal to its stock pipeline, its bad inputs, its export round trip)."""

from __future__ import annotations

import pytest
import torch
from tiny import (
    assert_on_policy_ratios_are_one,
    assert_same_gradients,
    checkpointing_gradients,
    fit_one_iteration,
    make_module,
    randomize_lora,
    save_teacher_checkpoint,
)

from callbacks import ReferenceModel
from flowrl.algorithms import AWM, CRD, DGPO, GRPO, NFT, DiffusionDPO, DiffusionOPD, FlowDPPO
from flowrl.policy import PolicyConfig
from flowrl.rewards import WeightedReward

PROMPTS = ["a red circle"] * 2 + ["two blue squares"] * 2
ADV = torch.tensor([1.0, -1.0, 0.5, -0.5])


class MeanBrightness:
    """Mean brightness of each image or video: continuous values (JPEG sizes are whole bytes, and two samples of a
    tiny model can tie: a tied group of two forms no DPO pair)."""

    def __call__(self, images, prompts):
        return images.float().reshape(images.shape[0], -1).mean(1)


def condition_images(seed: int, size=(3, 16, 24)):
    """A random 8-bit RGB image as a condition (values k / 255, as decoded from a PNG)."""
    from flowrl.conditions import ConditionImages

    g = torch.Generator().manual_seed(seed)
    return ConditionImages.from_tensors(torch.randint(0, 256, size, generator=g).float() / 255)


def image_prompt_file(directory, prompts, size=(16, 24), images_per_row=1) -> str:
    """A JSONL prompt file whose rows name condition images (PNG files of ``size`` (height, width) written beside
    it), one distinct set per distinct prompt."""
    import json

    from PIL import Image

    rows = []
    for i, prompt in enumerate(dict.fromkeys(prompts)):
        paths = []
        for j in range(images_per_row):
            image = condition_images(100 * i + j, (3, *size))[0]
            path = directory / f"condition_{i}_{j}.png"
            Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy()).save(path)
            paths.append(path.name)
        rows.append(json.dumps({"prompt": prompt, "images": paths}))
    path = directory / "prompts_with_images.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


class FamilyContract:
    #: the family's tiny pipeline (``flowrl.policy.tiny``)
    family: str = ""
    #: the guidance scale its rollouts use (true CFG, or a distilled guidance input)
    guidance: float = 3.0
    #: the Flow-SDE noise level of its GRPO runs
    noise_level: float = 0.7
    #: policy options it needs on the tiny pipeline (e.g. frames, text length)
    policy_options: dict = {}
    #: the images (or videos) a rollout of 16 px decodes to, per sample
    image_shape: tuple = (3, 16, 16)
    #: the prompts of the rollouts (two groups of two)
    prompts: list[str] = PROMPTS

    @pytest.fixture()
    def path(self, tiny_pipeline_path):
        return tiny_pipeline_path(self.family)

    def conditions(self, prompts=None):
        """The condition images of ``prompts`` (default: :attr:`prompts`), one per prompt, for an image-conditioned
        family (editing, image-to-video); None for a text-conditioned one."""
        return None

    def training_prompts(self, prompt_file: str, directory) -> str:
        """The prompt file of its optimizer steps: an image-conditioned family's rows name condition images."""
        return prompt_file

    def rewards(self):
        """The rewards of its runs (None: the tests' default, JPEG incompressibility)."""
        return None

    def make(self, cls, path, *, finetune_type="lora", frozen_dtype="float32", **kw):
        policy = PolicyConfig(path, finetune_type=finetune_type, lora_rank=4, frozen_dtype=frozen_dtype,
                              **self.policy_options)
        rewards = self.rewards()
        kw = {"guidance_scale": self.guidance, "policy": policy, **({"rewards": rewards} if rewards else {}), **kw}
        return make_module(cls, path, **kw)

    def check_rewarded(self, module) -> None:
        """What a family checks of its rewards after an optimizer step (e.g. videos reach them whole)."""

    def check_checkpointing(self, path, finetune_type, off, on, calls) -> None:
        """What a family checks of gradient checkpointing beyond equal gradients."""

    @pytest.mark.parametrize("finetune_type, frozen_dtype", [("lora", "float32"), ("lora", "bfloat16"),
                                                             ("full", "bfloat16")])
    def test_grpo_on_policy_ratio_is_exactly_one(self, path, finetune_type, frozen_dtype):
        """Every rollout log-prob is recomputed bit for bit by the training pass, also with a bf16 frozen base, and
        with a fully trained float32 denoiser beside bf16 encoders and no autocast (their outputs read as float32)."""
        module = self.make(GRPO, path, finetune_type=finetune_type, frozen_dtype=frozen_dtype, clip_range=1e-2,
                           noise_level=self.noise_level)
        if finetune_type == "full":
            assert {p.dtype for p in module.policy.transformer.parameters()} == {torch.float32}
            assert not torch.is_autocast_enabled("cpu")
        randomize_lora(module)
        rollout = module.rollout(self.prompts, conditions=self.conditions())
        assert rollout.log_probs.dtype == torch.float32 and rollout.log_probs.shape == (4, 3)
        assert rollout.images.shape == (4, *self.image_shape)
        assert_on_policy_ratios_are_one(module, rollout, ADV)

    @pytest.mark.parametrize("finetune_type, frozen_dtype", [("lora", "float32"), ("lora", "bfloat16"),
                                                             ("full", "float32")])
    def test_fsdp2_shards_every_block_and_keeps_samples_ratios_and_gradients(self, path, one_process_mesh,
                                                                             finetune_type, frozen_dtype):
        """``fully_shard`` on the family's repeated blocks (as diffusers declares them) and on the denoiser: the
        same rollout as unsharded, on-policy ratios exactly 1, the same gradients (as DTensor shards)."""
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        from flowrl.policy.sharding import sharded_block_classes

        kw = {"finetune_type": finetune_type, "frozen_dtype": frozen_dtype, "clip_range": 1e-2,
              "noise_level": self.noise_level}
        plain, sharded = self.make(GRPO, path, **kw), self.make(GRPO, path, **kw)
        sharded.policy.load_state_dict(plain.policy.state_dict())
        sharded.policy.shard(one_process_mesh)
        blocks = [m for m in sharded.policy.transformer.modules()
                  if isinstance(m, tuple(sharded_block_classes(sharded.policy.transformer)))]
        assert blocks and all(isinstance(m, FSDPModule) for m in [*blocks, sharded.policy.transformer])
        assert all(isinstance(p, DTensor) for p in sharded.policy.transformer.parameters())
        rollouts = [m.rollout(self.prompts, conditions=self.conditions()) for m in (plain, sharded)]
        torch.testing.assert_close(rollouts[1].latents, rollouts[0].latents, rtol=1e-5, atol=1e-6)
        assert_on_policy_ratios_are_one(sharded, rollouts[1], ADV)
        grads = []
        for module, rollout in zip((plain, sharded), rollouts):
            module.training_loss(rollout, ADV, torch.arange(4), 0)["loss"].backward()
            grads.append({n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                          for n, p in module.policy.named_trainable_parameters()})
        assert_same_gradients(grads[0], grads[1])

    @pytest.mark.parametrize("cls, finetune_type, extra", [
        (GRPO, "lora", {}), (NFT, "lora", {"num_train_timesteps": 1}), (AWM, "lora", {"num_train_timesteps": 1}),
        (GRPO, "full", {}), (FlowDPPO, "lora", {}), (DGPO, "lora", {"num_train_timesteps": 1}),
        (CRD, "lora", {"num_train_timesteps": 1}), (DiffusionDPO, "lora", {"num_train_timesteps": 1, "dpo_beta": 100.0}),
        (DiffusionOPD, "lora", {"num_train_steps": 1}),
    ], ids=["grpo-lora", "nft-lora", "awm-lora", "grpo-full", "dppo-lora", "dgpo-lora", "crd-lora", "dpo-lora",
            "opd-lora"])
    def test_one_optimizer_step(self, path, prompt_file, tmp_path, cls, finetune_type, extra):
        """An optimizer step through Lightning moves the trained parameters, and only those: the adapters (LoRA) or
        the whole denoiser (full fine-tuning); nothing else of the pipeline moves."""
        callbacks = []
        if cls.needs_log_prob:  # SDE rollouts at the family's noise level
            extra = {"noise_level": self.noise_level, **extra}
        if cls is CRD:  # its KL anchor at the family's guidance, a reference to anchor to
            extra, callbacks = {"kl_cfg": self.guidance, **extra}, [ReferenceModel(kl_beta=0.1)]
        if cls is DiffusionOPD:  # a teacher of the family: a checkpoint of another LoRA of the same setup
            teacher = save_teacher_checkpoint(self.make(NFT, path, num_train_timesteps=1), tmp_path / "teacher.ckpt")
            extra = {"teachers": [{"path": teacher, "name": "t"}], **extra}
        if cls is DiffusionDPO and self.rewards() is None:  # distinct rewards in every group: a pair in each
            extra = {"rewards": WeightedReward({"brightness": MeanBrightness()}, {"brightness": 1.0}), **extra}
        module = self.make(cls, path, finetune_type=finetune_type, train_batch_size=4, **extra)
        trained = dict(module.policy.named_trainable_parameters())
        if finetune_type == "full":
            assert sum(p.numel() for p in trained.values()) == sum(
                p.numel() for p in module.policy.transformer.parameters())
        else:
            assert trained and all("lora" in n for n in trained)
        before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
        trainer = fit_one_iteration(module, self.training_prompts(prompt_file, tmp_path), callbacks=callbacks)
        assert trainer.global_step >= 1 and torch.isfinite(torch.as_tensor(trainer.logged_metrics["train/loss"]))
        after = dict(module.policy.named_parameters())
        assert after.keys() == before.keys()
        moved = {n for n in before if not torch.equal(after[n], before[n])}
        assert moved and moved <= set(trained), sorted(moved - set(trained))[:5]
        if cls is DiffusionOPD:
            assert trainer.logged_metrics["train/distill_kl_t"] > 0
        if cls is DiffusionDPO:
            assert trainer.logged_metrics["train/dpo_pairs"] == 2.0  # two groups of two with distinct rewards
        self.check_rewarded(module)

    @pytest.mark.parametrize("finetune_type", ["lora", "full"])
    def test_gradient_checkpointing_gives_the_same_gradients(self, path, finetune_type):
        conditions = self.conditions(self.prompts[1:3])
        off, on, calls = checkpointing_gradients(path, finetune_type, self.guidance, prompts=self.prompts[1:3],
                                                 conditions=conditions, **self.policy_options)
        assert calls >= 1  # the blocks really ran checkpointed
        assert_same_gradients(off, on)
        self.check_checkpointing(path, finetune_type, off, on, calls)
