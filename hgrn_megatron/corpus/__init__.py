"""hgrn_megatron.corpus: reading Pile-format shards (zstd JSON Lines) and counting what was read.

Below both the tokenizer (which trains on shards) and the training data pipeline (which packs them), so that
neither imports the other. Imports nothing from the project but `config_base`.
"""
from .counters import DataCounters, flatten_stats
from .shards import (
    SKIP_KINDS,
    UNKNOWN_SOURCE,
    BadRecord,
    DataError,
    Document,
    RecordParser,
    SkipWarner,
    StreamFault,
    iter_documents,
    iter_lines,
    resolve_shards,
    shard_display_names,
)

__all__ = [
    "SKIP_KINDS",
    "UNKNOWN_SOURCE",
    "BadRecord",
    "DataCounters",
    "DataError",
    "Document",
    "RecordParser",
    "SkipWarner",
    "StreamFault",
    "flatten_stats",
    "iter_documents",
    "iter_lines",
    "resolve_shards",
    "shard_display_names",
]
