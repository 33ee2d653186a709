"""ImageReward on a tiny random BLIP saved to disk: the HF-format folder against the same score computed here from
the transformers modules, the original ``ImageReward.pt`` format (BLIP key names, built here by an explicit table)
against a forward pass written out on those keys as BLIP's vit.py and med.py compute it, strict key checks, and
batching."""

import json

import pytest
import torch
import torch.nn.functional as F

import flowrl.rewards.image_reward  # noqa: F401  (registers "image_reward")
from flowrl.errors import ConfigError
from flowrl.rewards import build_reward

MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward/ImageReward.py
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "two", "blue", "squares", "green",
         "triangle", "photo", "of", "cat", "the", "##s"]
VISION = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 8, "layer_norm_eps": 1e-6}
TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2,
        "max_position_embeddings": 40, "vocab_size": len(WORDS) + 2}  # + [DEC], [ENC]
PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a photo of a cat", "the cat"]


def images(n=5, seed=0, size=(40, 48)):
    return torch.randint(0, 256, (n, 3, *size), generator=torch.Generator().manual_seed(seed)).float() / 255


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An HF-format folder (BlipForImageTextRetrieval + mlp.safetensors + a BERT tokenizer without ImageReward's
    special tokens, as bert-base-uncased ships) and the model's state dicts."""
    from safetensors.torch import save_file
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval

    from flowrl.rewards.clip import AestheticHead

    path = tmp_path_factory.mktemp("tiny-image-reward")
    (path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    blip = BlipForImageTextRetrieval(BlipConfig(text_config=TEXT, vision_config=VISION)).eval()
    head = AestheticHead(TEXT["hidden_size"]).eval()
    with torch.no_grad():  # weights large enough that every input matters
        for module in (blip, head):
            for name, p in module.named_parameters():
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name.lower() and name.endswith("weight") else 0))
    blip.save_pretrained(path)
    save_file(head.state_dict(), path / "mlp.safetensors")
    return {"path": str(path), "blip": blip.state_dict(), "mlp": head.state_dict()}


def authors_tokens(path, prompts):
    """BLIP init_tokenizer + ImageReward.score's tokenizer call; the first token stays [CLS]."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(path)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")


def pixels(imgs):
    from transformers import CLIPImageProcessorPil

    from flowrl.rewards.base import to_pil

    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return processor(images=to_pil(imgs), return_tensors="pt")["pixel_values"]


def mlp(state, x):
    for i in (0, 2, 4, 6, 7):  # Linear layers; the dropouts between them are identities at inference
        x = F.linear(x, state[f"layers.{i}.weight"], state[f"layers.{i}.bias"])
    return ((x - MEAN) / STD).squeeze(-1)


def hf_scores(path, mlp_state, imgs, prompts):
    from transformers import BlipForImageTextRetrieval

    blip = BlipForImageTextRetrieval.from_pretrained(path).eval()
    tok = authors_tokens(path, prompts)
    with torch.no_grad():
        image_embeds = blip.vision_model(pixel_values=pixels(imgs)).last_hidden_state
        text = blip.text_encoder(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                                 encoder_hidden_states=image_embeds,
                                 encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long))
        return mlp(mlp_state, text.last_hidden_state[:, 0, :])


def test_hf_folder_equals_the_score_from_the_transformers_modules(tiny):
    imgs = images()
    reward = build_reward("image_reward", model_name_or_path=tiny["path"])  # tokenizer: the folder's
    scores = reward(imgs, PROMPTS)
    torch.testing.assert_close(scores, hf_scores(tiny["path"], tiny["mlp"], imgs, PROMPTS), atol=1e-5, rtol=1e-5)
    tok = reward.tokenize(PROMPTS)
    assert tok["input_ids"].shape == (5, 35) and (tok["input_ids"][:, 0] == WORDS.index("[CLS]")).all()
    assert reward.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(WORDS), len(WORDS) + 1]
    # both the image and the prompt move the score
    assert scores.std() > 1e-3
    assert not torch.allclose(reward(imgs, PROMPTS[::-1]), scores)
    assert not torch.allclose(reward(images(seed=1), PROMPTS), scores)


# --- the original release format ---------------------------------------------------------------------------------

def original_checkpoint(blip, head):
    """ImageReward.pt's keys (BLIP models/vit.py, models/med.py, ImageReward's MLP), written out name by name."""
    V, T = "vision_model.", "text_encoder."
    taken = set()

    class Take(dict):  # records which model keys the table read
        def __getitem__(self, key):
            taken.add(key)
            return super().__getitem__(key)

    blip = Take(blip)
    out = {"blip.visual_encoder.cls_token": blip[V + "embeddings.class_embedding"],
           "blip.visual_encoder.pos_embed": blip[V + "embeddings.position_embedding"]}
    for p in ("weight", "bias"):
        out[f"blip.visual_encoder.patch_embed.proj.{p}"] = blip[f"{V}embeddings.patch_embedding.{p}"]
        out[f"blip.visual_encoder.norm.{p}"] = blip[f"{V}post_layernorm.{p}"]
        for i in range(VISION["num_hidden_layers"]):
            for theirs, ours in (("norm1", "layer_norm1"), ("attn.qkv", "self_attn.qkv"),
                                 ("attn.proj", "self_attn.projection"), ("norm2", "layer_norm2"),
                                 ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                out[f"blip.visual_encoder.blocks.{i}.{theirs}.{p}"] = blip[f"{V}encoder.layers.{i}.{ours}.{p}"]
        # med.py's BertModel (BertEmbeddings without token types, BertLayer with crossattention, no pooler)
        text = ["embeddings.LayerNorm"]
        for i in range(TEXT["num_hidden_layers"]):
            for block in ("attention", "crossattention"):
                text += [f"encoder.layer.{i}.{block}.self.{x}" for x in ("query", "key", "value")]
                text += [f"encoder.layer.{i}.{block}.output.{x}" for x in ("dense", "LayerNorm")]
            text += [f"encoder.layer.{i}.{x}" for x in ("intermediate.dense", "output.dense", "output.LayerNorm")]
        for name in text:
            out[f"blip.text_encoder.{name}.{p}"] = blip[f"{T}{name}.{p}"]
        out[f"blip.vision_proj.{p}"] = blip[f"vision_proj.{p}"]  # in the release, unused by the score
        out[f"blip.text_proj.{p}"] = blip[f"text_proj.{p}"]
    for name in ("word_embeddings", "position_embeddings"):
        out[f"blip.text_encoder.embeddings.{name}.weight"] = blip[f"{T}embeddings.{name}.weight"]
    out["blip.text_encoder.embeddings.position_ids"] = torch.arange(TEXT["max_position_embeddings"])[None]
    assert {k for k in taken if k.startswith((V, T))} == {k for k in blip if k.startswith((V, T))}  # all of it
    out.update({f"mlp.{k}": v for k, v in head.items()})
    return {k: v.clone() for k, v in out.items()}


MED_CONFIG = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.1, "initializer_range": 0.02, "layer_norm_eps": 1e-12, "model_type": "bert",
              "pad_token_id": 0, "type_vocab_size": 2, "encoder_width": 768, "add_cross_attention": True,
              **{k: v for k, v in TEXT.items()}}


def blip_reference_scores(sd, imgs, prompts, tokenizer_path):
    """BLIP's VisionTransformer.forward (timm blocks, LayerNorm eps 1e-6), med.py's BertModel in multimodal mode
    (extended masks (1 - mask) * -10000, LayerNorm eps 1e-12), [CLS], the MLP: on the original keys."""
    x, heads = pixels(imgs), VISION["num_attention_heads"]
    v = "blip.visual_encoder."

    def ln(x, key, eps):
        return F.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], eps)

    def lin(x, key):
        return F.linear(x, sd[key + ".weight"], sd[key + ".bias"])

    x = F.conv2d(x, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=VISION["patch_size"])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[v + "cls_token"].expand(len(x), -1, -1), x], 1)
    x = x + sd[v + "pos_embed"][:, :x.shape[1]]
    for i in range(VISION["num_hidden_layers"]):
        b = f"{v}blocks.{i}."
        h = ln(x, b + "norm1", 1e-6)
        B, N, C = h.shape
        qkv = lin(h, b + "attn.qkv").reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1) * (C // heads) ** -0.5).softmax(-1)
        x = x + lin((attn @ qkv[2]).transpose(1, 2).reshape(B, N, C), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    image = ln(x, v + "norm", 1e-6)

    def attention(x, ctx, mask, key):
        B, L, C = x.shape

        def split(t):
            return t.view(B, -1, heads, C // heads).transpose(1, 2)

        q, k, w = split(lin(x, key + ".self.query")), split(lin(ctx, key + ".self.key")), split(lin(ctx, key + ".self.value"))
        probs = (q @ k.transpose(-1, -2) / (C // heads) ** 0.5 + mask).softmax(-1)
        out = (probs @ w).transpose(1, 2).reshape(B, L, C)
        return ln(lin(out, key + ".output.dense") + x, key + ".output.LayerNorm", 1e-12)

    t = "blip.text_encoder."
    tok = authors_tokens(tokenizer_path, prompts)
    ids, mask = tok["input_ids"], (1.0 - tok["attention_mask"][:, None, None, :].float()) * -10000.0
    x = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    x = ln(x, t + "embeddings.LayerNorm", 1e-12)
    for i in range(TEXT["num_hidden_layers"]):
        b = f"{t}encoder.layer.{i}."
        x = attention(x, x, mask, b + "attention")
        x = attention(x, image, 0.0, b + "crossattention")
        x = ln(lin(F.gelu(lin(x, b + "intermediate.dense")), b + "output.dense") + x, b + "output.LayerNorm", 1e-12)
    return mlp({k[4:]: val for k, val in sd.items() if k.startswith("mlp.")}, x[:, 0, :])


@pytest.fixture(scope="module")
def original(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-image-reward-original")
    sd = original_checkpoint(tiny["blip"], tiny["mlp"])
    torch.save(sd, path / "ImageReward.pt")
    (path / "med_config.json").write_text(json.dumps(MED_CONFIG))
    return {"path": path, "sd": sd}


def test_original_checkpoint_scores_as_blip_and_equals_the_hf_folder(tiny, original):
    imgs = images()
    # the default ViT settings but the tiny sizes: LayerNorm eps 1e-6 comes from the loader's ViT-L defaults
    kwargs = {"tokenizer_name_or_path": tiny["path"],
              "vision_config": {k: v for k, v in VISION.items() if k != "layer_norm_eps"}}
    from_dir = build_reward("image_reward", model_name_or_path=str(original["path"]), **kwargs)
    from_file = build_reward("image_reward", model_name_or_path=str(original["path"] / "ImageReward.pt"),
                             med_config=str(original["path"] / "med_config.json"), **kwargs)
    scores = from_dir(imgs, PROMPTS)
    with torch.no_grad():
        reference = blip_reference_scores(original["sd"], imgs, PROMPTS, tiny["path"])
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_file(imgs, PROMPTS), scores, atol=0, rtol=0)
    hf = build_reward("image_reward", model_name_or_path=tiny["path"])
    torch.testing.assert_close(hf(imgs, PROMPTS), scores, atol=1e-6, rtol=1e-6)


def test_crop_rounds_as_torchvision():
    """(40, 44) -> (32, 35) after the resize: torchvision's CenterCrop starts at round(1.5) = 2, not 1."""
    from PIL import Image

    from flowrl.rewards.image_reward import PIXEL_MEAN, PIXEL_STD, preprocess

    im = Image.fromarray(torch.randint(0, 256, (44, 40, 3), dtype=torch.uint8).numpy())
    resized = torch.tensor(list(im.resize((32, 35), Image.BICUBIC).getdata()), dtype=torch.float32).view(35, 32, 3)
    expected = (resized[2:34].permute(2, 0, 1) / 255 - torch.tensor(PIXEL_MEAN)[:, None, None]) / torch.tensor(PIXEL_STD)[:, None, None]
    torch.testing.assert_close(preprocess(im, 32), expected)


@pytest.mark.parametrize("change, named", [
    ("drop", "blip.visual_encoder.blocks.1.attn.qkv.bias"),
    ("drop", "blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"),
    ("drop", "mlp.layers.7.weight"),
    ("add", "blip.visual_encoder.head.weight"),
    ("add", "blip.itm_head.weight"),
])
def test_missing_and_unexpected_checkpoint_keys_are_named(tiny, original, tmp_path, change, named):
    sd = dict(original["sd"])
    if change == "drop":
        del sd[named]
    else:
        sd[named] = torch.zeros(2, 32)
    torch.save(sd, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(MED_CONFIG))
    with pytest.raises(ConfigError, match=("missing" if change == "drop" else "unexpected") + r" keys .*" + named):
        build_reward("image_reward", model_name_or_path=str(tmp_path), tokenizer_name_or_path=tiny["path"],
                     vision_config=VISION)


def test_a_config_that_does_not_describe_the_checkpoint_is_refused(tiny, original, tmp_path):
    kwargs = {"model_name_or_path": str(original["path"]), "tokenizer_name_or_path": tiny["path"]}
    with pytest.raises(ConfigError, match=r"missing keys .*blip\.visual_encoder\.blocks\.2\.attn\.qkv\.weight"):
        build_reward("image_reward", vision_config={**VISION, "num_hidden_layers": 3}, **kwargs)
    with pytest.raises(ConfigError, match=r"shapes .*blip\.visual_encoder\.blocks\.0\.mlp\.fc1\.weight \(37, 32\)"):
        build_reward("image_reward", vision_config={**VISION, "intermediate_size": 40}, **kwargs)
    (tmp_path / "config.json").write_text(open(f"{tiny['path']}/config.json").read())
    with pytest.raises(ConfigError, match="mlp.safetensors"):  # an HF-format folder without its head
        build_reward("image_reward", model_name_or_path=str(tmp_path), tokenizer_name_or_path=tiny["path"])


def test_scores_are_finite_one_per_image_and_do_not_depend_on_batching(tiny):
    imgs = images(7, seed=2, size=(40, 40))
    prompts = (PROMPTS * 2)[:7]
    whole = build_reward("image_reward", model_name_or_path=tiny["path"])(imgs, prompts)
    batched = build_reward("image_reward", model_name_or_path=tiny["path"], batch_size=3)(imgs, prompts)
    assert whole.shape == (7,) and whole.dtype == torch.float32 and torch.isfinite(whole).all()
    torch.testing.assert_close(batched, whole, atol=1e-6, rtol=1e-5)  # scores ~200: float32 rounding of the batch
    half = build_reward("image_reward", model_name_or_path=tiny["path"], scale=0.5)(imgs[:1], prompts[:1])
    torch.testing.assert_close(half, whole[:1] / 2)
