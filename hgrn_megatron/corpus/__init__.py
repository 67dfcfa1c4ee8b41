"""hgrn_megatron.corpus: reading Pile-format shards (zstd JSON Lines) and counting what was read.

Below both the tokenizer (which trains on shards) and the training data pipeline (which packs them), so that
neither imports the other. Imports nothing from the project but `config_base`. Modules: `shards` (finding and
streaming shards), `records` (`RecordFormat`, what a line means, skip warnings), `counters`.
"""
from .counters import DataCounters
from .records import (
    DEFAULT_FORMAT,
    SKIP_KINDS,
    UNKNOWN_SOURCE,
    BadRecord,
    Document,
    RecordFormat,
    RecordParser,
    SkipWarner,
    as_record,
    iter_documents,
)
from .shards import DataError, OversizedLine, StreamFault, iter_lines, resolve_shards, shard_display_names

__all__ = [
    "DEFAULT_FORMAT",
    "SKIP_KINDS",
    "UNKNOWN_SOURCE",
    "BadRecord",
    "DataCounters",
    "DataError",
    "Document",
    "OversizedLine",
    "RecordFormat",
    "RecordParser",
    "SkipWarner",
    "StreamFault",
    "as_record",
    "iter_documents",
    "iter_lines",
    "resolve_shards",
    "shard_display_names",
]
