"""The toy world's pipeline: the tiny SD3 of :mod:`flowrl.policy.tiny.sd3` (its shipped model starts from it) and
the word tokenizer over the toy's vocabulary."""

from flowrl.policy.tiny.sd3 import build_tiny_sd3_pipeline
from flowrl.policy.tiny.text import BOS, DEFAULT_WORDS, EOS, build_word_tokenizer

__all__ = ["BOS", "DEFAULT_WORDS", "EOS", "build_tiny_sd3_pipeline", "build_word_tokenizer"]
