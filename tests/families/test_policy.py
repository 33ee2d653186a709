import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from flowrl.policy import FlowMatchingPolicy, PolicyConfig
from flowrl.toy.pipeline import build_tiny_sd3_pipeline


def test_tiny_pipeline_roundtrip_through_from_pretrained(tiny_sd3_path):
    policy = FlowMatchingPolicy.from_pretrained(tiny_sd3_path, finetune_type="full")
    assert isinstance(policy.pipeline, StableDiffusion3Pipeline)
    assert policy.pipeline.text_encoder_3 is None
    reference = build_tiny_sd3_pipeline(seed=0, sample_size=16, num_layers=1, vae_channels=8)
    for (n, a), (_, b) in zip(policy.transformer.state_dict().items(), reference.transformer.state_dict().items()):
        assert torch.equal(a, b), n


def test_encode_latents_velocity_decode_shapes(tiny_sd3_path):
    policy = FlowMatchingPolicy.from_pretrained(tiny_sd3_path, lora_rank=2)
    cond = policy.encode_prompt(["a red circle", "two squares"])
    assert cond["prompt_embeds"].shape[0] == 2 and cond["pooled_projections"].shape == (2, 64)
    x = policy.prepare_latents(2, 16, 16, torch.Generator().manual_seed(0))
    assert x.shape == (2, 4, 16, 16)
    torch.testing.assert_close(x, policy.prepare_latents(2, 16, 16, torch.Generator().manual_seed(0)))
    v = policy.velocity(x, torch.tensor([0.9, 0.5]), cond, guidance_scale=3.0)
    assert v.dtype == torch.float32 and v.shape == x.shape and v.requires_grad
    images = policy.decode(x)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    sigmas = policy.sigmas(5, 16, 16)
    assert sigmas.shape == (6,) and sigmas[0] == 1 and sigmas[-1] == 0 and (sigmas.diff() < 0).all()


@pytest.mark.parametrize("uncond_gradient", [True, False])
def test_guidance_combines_branches_with_the_chosen_gradient(tiny_sd3_path, uncond_gradient):
    policy = FlowMatchingPolicy.from_pretrained(tiny_sd3_path, finetune_type="full", uncond_gradient=uncond_gradient)
    cond = policy.encode_prompt(["a red circle", "two blue squares"])
    x = torch.randn(2, 4, 16, 16)
    sigma = torch.tensor([0.7, 0.4])
    v_c = policy.velocity(x, sigma, cond, 1.0)
    v_u = policy.velocity(x, sigma, policy.null_condition(2), 1.0)
    v_g = policy.velocity(x, sigma, cond, 4.0)
    torch.testing.assert_close(v_g, v_u + 4.0 * (v_c - v_u), rtol=1e-4, atol=1e-5)
    param = next(policy.trainable_parameters())
    (g_guided,) = torch.autograd.grad(v_g.sum(), param)
    (g_cond,) = torch.autograd.grad(v_c.sum(), param, retain_graph=True)
    (g_uncond,) = torch.autograd.grad(v_u.sum(), param)
    # d v_g = 4 d v_c - 3 d v_u (Flow-GRPO's gradient of the guided policy), or 4 d v_c with the
    # unconditional branch treated as a constant.
    expected = 4.0 * g_cond - 3.0 * g_uncond if uncond_gradient else 4.0 * g_cond
    torch.testing.assert_close(g_guided, expected, rtol=1e-3, atol=1e-5)
    assert not torch.allclose(g_uncond, torch.zeros_like(g_uncond))


def test_lora_trains_only_adapters_and_can_be_disabled(tiny_sd3_path):
    policy = FlowMatchingPolicy.from_pretrained(tiny_sd3_path, lora_rank=4)
    names = [n for n, _ in policy.named_trainable_parameters()]
    assert names and all("lora" in n for n in names)
    assert not any(p.requires_grad for p in policy.frozen.parameters())
    cond = policy.encode_prompt(["a red circle"])
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.1)  # move the adapter away from its zero init
    v_lora = policy.velocity(x, 0.5, cond)
    with policy.adapter_disabled():
        v_base = policy.velocity(x, 0.5, cond)
    assert not torch.allclose(v_lora, v_base)
    full = FlowMatchingPolicy.from_pretrained(tiny_sd3_path, finetune_type="full")
    torch.testing.assert_close(v_base, full.velocity(x, 0.5, full.encode_prompt(["a red circle"])))


def test_full_finetune_trains_the_whole_transformer(tiny_sd3_path):
    policy = FlowMatchingPolicy.from_pretrained(tiny_sd3_path, finetune_type="full")
    n_trainable = sum(p.numel() for p in policy.trainable_parameters())
    assert n_trainable == sum(p.numel() for p in policy.transformer.parameters())
    with pytest.raises(RuntimeError, match="finetune_type='lora'"):
        with policy.adapter_disabled():
            pass


def test_bad_policy_config_names_the_fix(tiny_sd3_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PolicyConfig("./no/such/model")
    with pytest.raises(ValueError, match="finetune_type"):
        PolicyConfig(tiny_sd3_path, finetune_type="qlora")
    with pytest.raises(ValueError, match=r"match no module.*Linear layers are named like.*attn\.to_out\.0.*ff\.net\.2"):
        FlowMatchingPolicy.from_pretrained(tiny_sd3_path, target_modules=["not_a_layer"])
    policy = FlowMatchingPolicy.from_pretrained(tiny_sd3_path, lora_rank=2)
    with pytest.raises(ValueError, match="multiple of"):
        policy.check_resolution(15, 16)


def test_policy_from_a_pipeline_object_drops_into_an_algorithm():
    from flowrl.algorithms import GRPO

    policy = FlowMatchingPolicy(build_tiny_sd3_pipeline(seed=1, sample_size=16, num_layers=1), lora_rank=2)
    module = GRPO(policy=policy, group_size=2, resolution=16, num_inference_steps=3)
    assert module.policy is policy
    assert "policy" not in module.hparams  # an object, not config data
    rollout = module.rollout(["a red circle", "a red circle"])
    assert rollout.images.shape == (2, 3, 16, 16)


def test_conditioning_selects_expands_and_concatenates_every_kind_of_field():
    """The algorithms only select / expand / concatenate samples; tensors, per-sample lists and shared fields
    (e.g. FLUX position ids, Qwen-Image image shapes) each follow their own rule."""
    from flowrl.policy import Conditioning

    embeds = torch.arange(12.0).reshape(3, 2, 2)
    ids = torch.zeros(5, 3)
    cond = Conditioning({"prompt_embeds": embeds}, {"img_shapes": [(1, 2), (3, 4), (5, 6)]}, {"txt_ids": ids})
    assert len(cond) == 3 and cond["txt_ids"] is ids and "img_shapes" in cond
    picked = cond.select(torch.tensor([2, 0, 2]))
    assert torch.equal(picked["prompt_embeds"], embeds[[2, 0, 2]]) and picked["img_shapes"] == [(5, 6), (1, 2), (5, 6)]
    assert picked["txt_ids"] is ids
    sliced = cond.select(slice(1, 3))
    assert torch.equal(sliced["prompt_embeds"], embeds[1:3]) and sliced["img_shapes"] == [(3, 4), (5, 6)]
    one = cond.select([1]).expand(4)
    assert one["prompt_embeds"].shape == (4, 2, 2) and one["img_shapes"] == [(3, 4)] * 4
    both = Conditioning.cat([one, cond])
    assert len(both) == 7 and torch.equal(both["prompt_embeds"][4:], embeds) and both["txt_ids"] is ids
    with pytest.raises(ValueError, match="one-sample"):
        cond.expand(2)


def test_dynamic_shift_mu_is_diffusers_line():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from flowrl.policy.adapter import dynamic_shift_mu

    cfg = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
    for n in (64, 256, 1024, 4096):
        assert dynamic_shift_mu(cfg, n) == pytest.approx(calculate_shift(n, 256, 4096, 0.5, 1.15))


def test_sd3_ode_sampling_equals_the_stock_pipeline(tiny_sd3_path):
    """flowrl's all-ODE sample() from noise x is StableDiffusion3Pipeline.__call__ from the same x: same sigmas,
    timestep input, CFG against the empty prompt and decoding-free latents."""
    from tiny import make_module

    from flowrl.algorithms import GRPO

    module = make_module(GRPO, tiny_sd3_path, finetune_type="full")
    policy, h, w, n, g = module.policy, 16, 16, 4, 3.0
    x = policy.prepare_latents(2, h, w, torch.Generator().manual_seed(1))
    prompts = ["a red circle", "two blue squares"]
    ours = module.sampler.sample(prompts, h, w, n, g, torch.Generator().manual_seed(0), latents=x)
    pipe = policy.pipeline
    stock = pipe(prompts, height=h, width=w, num_inference_steps=n, guidance_scale=g, latents=x.clone(),
                 max_sequence_length=policy.adapter.max_sequence_length, output_type="latent").images  # 0: no T5 tokens
    assert torch.equal(ours.sigmas, pipe.scheduler.sigmas.float())
    torch.testing.assert_close(ours.final, stock.float(), rtol=1e-5, atol=1e-5)


def test_a_pipeline_without_an_adapter_lists_the_supported_families():
    from flowrl.errors import ConfigError
    from flowrl.policy import adapter_for

    class MyPipeline:  # any diffusers pipeline class flowrl has no adapter file for
        pass

    with pytest.raises(ConfigError, match=r"no flowrl adapter for pipeline class 'MyPipeline'.*FluxPipeline.*"
                                          r"QwenImagePipeline.*StableDiffusion3Pipeline.*WanPipeline.*register_adapter"):
        adapter_for(MyPipeline())
