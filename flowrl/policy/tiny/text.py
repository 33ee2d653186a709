"""In-memory tokenizers shared by the tiny pipelines (no download)."""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import trainers
from transformers import CLIPTokenizer, T5TokenizerFast

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

DEFAULT_WORDS = (
    "a an one two three four five six the of and with photo picture image "
    "red green blue yellow purple orange cyan white black pink brown gray "
    "circle circles square squares triangle triangles cat cats dog dogs "
    "left right above below on top bottom next to"
).split()


def build_word_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 16) -> CLIPTokenizer:
    """A real ``CLIPTokenizer`` whose BPE merges make every word in ``words`` a single token.

    Trained in memory with the same normaliser and pre-tokeniser as CLIP, so it saves and loads with
    ``save_pretrained`` / ``from_pretrained`` like any CLIP tokenizer.
    """
    words = sorted(set(words))
    backend = CLIPTokenizer().backend_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=100_000, special_tokens=[BOS, EOS], end_of_word_suffix="</w>", show_progress=False
    )
    backend.train_from_iterator([" ".join(words)] * 4, trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    return CLIPTokenizer(vocab=model["vocab"], merges=merges, model_max_length=model_max_length)



def build_t5_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 16) -> T5TokenizerFast:
    """A real T5 / UMT5 tokenizer (Unigram; ``<pad>`` 0, ``</s>`` 1 appended, ``<unk>`` 2) whose pieces are ``words``
    plus single letters, built in memory; it saves and loads with ``save_pretrained`` / ``from_pretrained``."""
    words = sorted(set(words))
    letters = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in words]
    vocab += [(c, -5.0) for c in letters]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def small_qwen3_config(tokenizer, hidden: int, layers: int):
    """A Qwen3 text encoder's config of ``hidden`` width and ``layers`` layers over ``tokenizer`` (a Qwen2-style one:
    ``<|endoftext|>`` pads and begins, ``<|im_end|>`` ends), as FLUX.2-klein and Z-Image use."""
    from transformers import Qwen3Config

    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
                       max_position_embeddings=1024, bos_token_id=pad,
                       eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=pad)


def two_stage_vae_kwargs(latent_channels: int, vae_channels: int) -> dict:
    """An image VAE of two stages (``vae_scale_factor`` 2) without quant convs, FLUX's layout at tiny width."""
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(vae_channels, vae_channels),
                layers_per_block=1, latent_channels=latent_channels, norm_num_groups=min(8, vae_channels),
                sample_size=32, use_quant_conv=False, use_post_quant_conv=False)
