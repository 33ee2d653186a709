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
