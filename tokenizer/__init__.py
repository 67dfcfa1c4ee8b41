"""hgrn_megatron.tokenizer: SentencePiece tokenizer training, loading and metadata checks.

    tok = Tokenizer.load("tokenizers/pile-32k")        # the directory or its tokenizer.model
    ids = tok.encode(text); text == tok.decode(ids)    # exact for any UTF-8 (byte fallback)
    padded_vocab_size(tok.vocab_size, tp_size)         # embedding rows, a multiple of 128 x TP

Train with `hgrn-tokenizer train --shards 'data/*.jsonl.zst' --out DIR --vocab-size 32000`. Reads shards through
`hgrn_megatron.corpus.shards`.
"""
from .config import TokenizerConfig, TokenizerTrainConfig
from .model import (
    SPECIAL_IDS,
    Tokenizer,
    TokenizerError,
    padded_vocab_size,
    sha256_file,
    vocab_padding,
)
from .train import train_tokenizer

__all__ = [
    "SPECIAL_IDS",
    "Tokenizer",
    "TokenizerConfig",
    "TokenizerError",
    "TokenizerTrainConfig",
    "padded_vocab_size",
    "sha256_file",
    "train_tokenizer",
    "vocab_padding",
]
