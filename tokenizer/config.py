"""`TokenizerConfig` (the run config's `tokenizer` section) and `TokenizerTrainConfig` (training options)."""
from __future__ import annotations

import os
from typing import Literal

from pydantic import Field

from hgrn_megatron.config_base import ConfigNode


class TokenizerTrainConfig(ConfigNode):
    """How `hgrn-tokenizer train` / `train_tokenizer` builds a SentencePiece model from shards."""

    vocab_size: int = Field(
        32000, gt=260, description="Pieces in the model, including the 4 special and 256 byte-fallback pieces."
    )
    model_type: Literal["bpe", "unigram"] = "bpe"
    sample_documents: int | None = Field(
        None, gt=0, description="Documents to sample, evenly (round-robin) across shards; None = no limit."
    )
    sample_chars: int | None = Field(
        100_000_000, gt=0, description="Characters to sample, evenly across shards; None = no limit."
    )
    text_field: str = Field("text", description="Dotted path of the document text in each JSON record.")
    character_coverage: float = Field(
        0.9999, gt=0, le=1, description="Share of characters covered by pieces; the rest fall back to bytes."
    )
    max_sentence_length: int = Field(
        8192, gt=0, description="Bytes per training line; longer lines are cut into pieces of this size."
    )
    num_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, gt=0)


class TokenizerConfig(ConfigNode):
    """Which trained tokenizer a run uses."""

    model: str = Field(description="The SentencePiece .model file, or the directory holding tokenizer.model.")
