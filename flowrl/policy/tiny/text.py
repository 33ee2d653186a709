"""In-memory tokenizers shared by the tiny pipelines (no download)."""

from __future__ import annotations

from collections.abc import Iterable

from transformers import T5TokenizerFast

from flowrl.toy.pipeline import DEFAULT_WORDS


def build_t5_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 16) -> T5TokenizerFast:
    """A real T5 / UMT5 tokenizer (Unigram; ``<pad>`` 0, ``</s>`` 1 appended, ``<unk>`` 2) whose pieces are ``words``
    plus single letters, built in memory; it saves and loads with ``save_pretrained`` / ``from_pretrained``."""
    words = sorted(set(words))
    letters = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in words]
    vocab += [(c, -5.0) for c in letters]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
