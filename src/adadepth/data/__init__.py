"""Corpora, tokenizers and cached token streams for language-model training."""

from adadepth.data.corpora import Corpus, cache_dir, load_corpus
from adadepth.data.packing import TokenData, prepare_tokens
from adadepth.data.tokenizers import Tokenizer, build_tokenizer, load_tokenizer

__all__ = [
    "Corpus",
    "TokenData",
    "Tokenizer",
    "build_tokenizer",
    "cache_dir",
    "load_corpus",
    "load_tokenizer",
    "prepare_tokens",
]
