"""HPSv2 on tiny random CLIPs: the transformers-folder form against the score computed here (cosine of the
normalised embeddings), and the open_clip-checkpoint form against an open_clip-style model written here from
scratch (OpenAI CLIP layout and names: ``nn.MultiheadAttention`` with a packed ``in_proj``, ``visual.proj``...),
whose state dict goes through the converter into a transformers ``CLIPModel``."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

import flowrl.rewards.hps  # noqa: F401  (registers "hpsv2")
from flowrl.errors import ConfigError
from flowrl.rewards import build_reward
from flowrl.rewards.base import to_pil
from flowrl.rewards.hps import letterbox, openclip_to_hf
from flowrl.toy import TOY_CHECKPOINT

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TOY_CHECKPOINT / "tokenizer")


def tiny_config(tokenizer, hidden_act="gelu", eos_token_id=None):
    from transformers import CLIPConfig

    common = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2,
              "hidden_act": hidden_act}
    return CLIPConfig(
        text_config={**common, "vocab_size": len(tokenizer), "max_position_embeddings": 77,
                     "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id if eos_token_id is None else eos_token_id},
        vision_config={**common, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )


def save_processor(tokenizer, path):
    from transformers import CLIPImageProcessor, CLIPProcessor

    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(path)


def images(n=3, size=(40, 40), seed=0):
    return torch.randint(0, 256, (n, 3, *size), generator=torch.Generator().manual_seed(seed)).float() / 255


def features(out):
    return out.pooler_output if hasattr(out, "pooler_output") else out


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


# ---- an open_clip-style CLIP, written independently of the converter -------------------------------------------

class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads, mlp_width, act):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)  # (L, N, D); in_proj_weight = [q; k; v]
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, mlp_width)), ("gelu", act()),
                                              ("c_proj", nn.Linear(mlp_width, width))]))

    def forward(self, x, attn_mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_width, act):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_width, act) for _ in range(layers)])

    def forward(self, x, attn_mask=None):  # (N, L, D) in and out
        x = x.transpose(0, 1)
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x.transpose(0, 1)


class VisionTransformer(nn.Module):
    def __init__(self, cfg, output_dim, act):
        super().__init__()
        width, grid = cfg.hidden_size, cfg.image_size // cfg.patch_size
        self.conv1 = nn.Conv2d(3, width, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size, act)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (N, grid², width)
        x = torch.cat([self.class_embedding.expand(len(x), 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class OpenClipStyle(nn.Module):
    """open_clip's ``CLIP`` (the ViT-H-14 layout HPSv2 fine-tunes): visual tower under ``visual.``, text tower at
    the top level, causal text attention, text pooled at the end-of-text token (open_clip: ``text.argmax(-1)``)."""

    def __init__(self, config):
        super().__init__()
        text = config.text_config
        act = {"gelu": nn.GELU, "quick_gelu": QuickGELU}[text.hidden_act]
        self.visual = VisionTransformer(config.vision_config, config.projection_dim, act)
        self.token_embedding = nn.Embedding(text.vocab_size, text.hidden_size)
        self.positional_embedding = nn.Parameter(torch.empty(text.max_position_embeddings, text.hidden_size))
        self.transformer = Transformer(text.hidden_size, text.num_hidden_layers, text.num_attention_heads,
                                       text.intermediate_size, act)
        self.ln_final = nn.LayerNorm(text.hidden_size)
        self.text_projection = nn.Parameter(torch.empty(text.hidden_size, config.projection_dim))
        self.logit_scale = nn.Parameter(torch.tensor(2.5))
        for name, p in self.named_parameters():  # random everything: no layer norm left at 1/0 to hide a swap
            nn.init.normal_(p, mean=1.0 if "ln" in name and name.endswith("weight") else 0.0, std=0.2)

    def encode_image(self, pixels):
        return self.visual(pixels)

    def encode_text(self, text, eot_index=None):
        n = text.shape[1]
        x = self.token_embedding(text) + self.positional_embedding[:n]
        causal = torch.full((n, n), float("-inf")).triu(1)
        x = self.ln_final(self.transformer(x, causal))
        eot_index = text.argmax(dim=-1) if eot_index is None else eot_index
        return x[torch.arange(len(x)), eot_index] @ self.text_projection


def handmade_ids(vocab_size, eot, lengths=(3, 9, 77), seed=0):
    """Token ids as open_clip's tokenizer lays them out (start, words, end-of-text, zero padding to 77) and
    the position of each end-of-text."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), 77, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.cat([torch.tensor([0]), torch.randint(2, vocab_size - 1, (n - 2,), generator=g),
                                  torch.tensor([eot])])
    return ids, torch.tensor(lengths) - 1


@pytest.fixture(scope="module")
def openclip(tokenizer, tmp_path_factory):
    """An open_clip-style model, its HPS-format checkpoint ``{"state_dict": ...}`` and a config+processor folder."""
    path = tmp_path_factory.mktemp("hps-openclip")
    config = tiny_config(tokenizer)
    config.save_pretrained(path)
    save_processor(tokenizer, path)
    torch.manual_seed(0)
    model = OpenClipStyle(config).eval()
    torch.save({"state_dict": model.state_dict()}, path / "HPS_tiny.pt")
    return model, config, path


# ---- tests --------------------------------------------------------------------------------------------------

def test_hf_folder_gives_the_cosine_of_the_normalised_embeddings(tokenizer, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    torch.manual_seed(1)
    CLIPModel(tiny_config(tokenizer)).save_pretrained(tmp_path)
    save_processor(tokenizer, tmp_path)
    model, processor = CLIPModel.from_pretrained(tmp_path).eval(), CLIPProcessor.from_pretrained(tmp_path)
    imgs = images()
    with torch.no_grad():
        img = unit(features(model.get_image_features(**processor(images=to_pil(imgs), return_tensors="pt"))))
        txt = unit(features(model.get_text_features(**processor(text=PROMPTS, padding=True, return_tensors="pt"))))
    expected = torch.diagonal(img @ txt.T)

    reward = build_reward("hpsv2", model_name_or_path=str(tmp_path), letterbox=False, batch_size=2)
    torch.testing.assert_close(reward(imgs, PROMPTS), expected, atol=1e-5, rtol=1e-5)
    scaled = build_reward("hpsv2", model_name_or_path=str(tmp_path), letterbox=False, scale=2.0)
    torch.testing.assert_close(scaled(imgs, PROMPTS), 2 * expected, atol=1e-5, rtol=1e-5)
    # Letterboxing leaves an image already at the model's size alone.
    exact = images(size=(32, 32))
    torch.testing.assert_close(build_reward("hpsv2", model_name_or_path=str(tmp_path))(exact, PROMPTS),
                               reward(exact, PROMPTS), atol=1e-6, rtol=1e-6)


def test_letterbox_pads_the_short_side_with_black_centred():
    wide = images(2, size=(20, 32))  # H=20, W=32: no resize, 6 black rows above and below
    boxed = letterbox(wide, 32)
    assert boxed.shape == (2, 3, 32, 32)
    assert boxed[:, :, :6].abs().max() == 0 and boxed[:, :, 26:].abs().max() == 0
    torch.testing.assert_close(boxed[:, :, 6:26], wide)
    tall = letterbox(images(1, size=(64, 40)), 32)  # resized to 32 x 20, 6 black columns left and right
    assert tall.shape == (1, 3, 32, 32)
    assert tall[..., :6].abs().max() == 0 and tall[..., 26:].abs().max() == 0 and tall[..., 6:26].min() > 0


def test_letterboxed_score_is_the_score_of_the_padded_picture(openclip):
    _, _, path = openclip
    boxed = build_reward("hpsv2", model_name_or_path=str(path / "HPS_tiny.pt"), config_name_or_path=str(path))
    plain = build_reward("hpsv2", model_name_or_path=str(path / "HPS_tiny.pt"), config_name_or_path=str(path),
                         letterbox=False)
    wide = images(3, size=(20, 32))
    padded = torch.zeros(3, 3, 32, 32)
    padded[:, :, 6:26] = wide
    torch.testing.assert_close(boxed(wide, PROMPTS), plain(padded, PROMPTS), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("hidden_act, legacy_eos", [("gelu", True), ("gelu", False), ("quick_gelu", False)])
def test_openclip_checkpoint_matches_the_openclip_style_forward(tokenizer, tmp_path, hidden_act, legacy_eos):
    # legacy_eos: eos_token_id 2, as in configs converted before transformers#24773 (the laion ones), where
    # transformers pools at input_ids.argmax() like open_clip; else it pools at the first eos_token_id.
    config = tiny_config(tokenizer, hidden_act, eos_token_id=2 if legacy_eos else None)
    config.save_pretrained(tmp_path)
    save_processor(tokenizer, tmp_path)
    torch.manual_seed(2)
    ref = OpenClipStyle(config).eval()
    assert {"visual.conv1.weight", "visual.transformer.resblocks.1.attn.in_proj_weight", "visual.proj",
            "transformer.resblocks.0.mlp.c_fc.bias", "ln_final.weight", "text_projection"} <= set(ref.state_dict())
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "hps.pt")
    reward = build_reward("hpsv2", model_name_or_path=str(tmp_path / "hps.pt"), config_name_or_path=str(tmp_path))

    vocab = config.text_config.vocab_size
    ids, eot_at = handmade_ids(vocab, eot=vocab - 1 if legacy_eos else tokenizer.eos_token_id)
    if legacy_eos:
        assert torch.equal(ids.argmax(-1), eot_at)  # open_clip's pooling rule picks the end-of-text token
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hf_img = features(reward.model.get_image_features(pixel_values=pixels))
        hf_txt = features(reward.model.get_text_features(input_ids=ids))
        torch.testing.assert_close(hf_img, ref.encode_image(pixels), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hf_txt, ref.encode_text(ids, eot_at), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reward.model.logit_scale.detach(), ref.logit_scale.detach())

    if not legacy_eos:  # the whole reward, through the processor and the toy tokenizer (eos 1, also its pad)
        from transformers import CLIPProcessor

        imgs = images(3, size=(32, 32))
        processor = CLIPProcessor.from_pretrained(tmp_path)
        tok = processor(text=PROMPTS, padding=True, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            img = unit(ref.encode_image(processor(images=to_pil(imgs), return_tensors="pt")["pixel_values"]))
            txt = unit(ref.encode_text(tok, (tok == tokenizer.eos_token_id).int().argmax(-1)))
        torch.testing.assert_close(reward(imgs, PROMPTS), (img * txt).sum(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", ["plain", "module-prefix", "module-prefix-unwrapped", "safetensors"])
def test_checkpoint_forms(openclip, tmp_path, form):
    ref, config, path = openclip
    state = ref.state_dict()
    if form == "safetensors":
        from safetensors.torch import save_file

        file = tmp_path / "hps.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, file)
    else:
        file = tmp_path / "hps.pt"
        if form.startswith("module-prefix"):
            state = {f"module.{k}": v for k, v in state.items()}
        torch.save(state if form in ("plain", "module-prefix-unwrapped") else {"state_dict": state}, file)
    reward = build_reward("hpsv2", model_name_or_path=str(file), config_name_or_path=str(path))
    expected = openclip_to_hf(ref.state_dict(), config)
    loaded = reward.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_missing_extra_and_misshaped_keys_are_named(openclip, tmp_path):
    ref, config, path = openclip
    state = ref.state_dict()
    missing = {k: v for k, v in state.items() if k != "visual.ln_post.bias"}
    with pytest.raises(ConfigError, match=r"missing keys \['visual\.ln_post\.bias'\]"):
        openclip_to_hf(missing, config)
    with pytest.raises(ConfigError, match=r"unexpected keys \['score_predictor\.weight'\]"):
        openclip_to_hf({**state, "score_predictor.weight": torch.zeros(1)}, config)
    with pytest.raises(ConfigError, match=r"mis-shaped keys \['text_projection \(32, 8\)"):
        openclip_to_hf({**state, "text_projection": torch.zeros(32, 8)}, config)
    deeper = {**state, **{k.replace("resblocks.1.", "resblocks.2."): v for k, v in state.items() if "resblocks.1." in k}}
    with pytest.raises(ConfigError, match=r"unexpected keys \['transformer\.resblocks\.2\."):
        openclip_to_hf(deeper, config)
    torch.save({"state_dict": missing}, tmp_path / "broken.pt")
    with pytest.raises(ConfigError, match="visual.ln_post.bias"):
        build_reward("hpsv2", model_name_or_path=str(tmp_path / "broken.pt"), config_name_or_path=str(path))
    with pytest.raises(ConfigError, match="is not a file"):
        build_reward("hpsv2", model_name_or_path=str(tmp_path / "absent.pt"), config_name_or_path=str(path))
