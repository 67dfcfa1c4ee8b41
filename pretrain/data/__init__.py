"""hgrn_megatron.pretrain.data: Pile-format shards -> documents -> packed samples, deterministic and resumable.

    loader = TrainLoader(cfg.data, tokenizer, seq_length, micro_batch_size, dp_rank, dp_size, state=saved)
    batch = next(loader)            # {"tokens": Long[mb, S+1], "doc_start": Bool[mb, S+1]}
    state = loader.state_dict()     # rank-local; merge_data_states([all ranks' states]) -> global state

Modules: `shards` (streaming zstd JSON Lines, bad-record kinds), `stream` (the endless record stream and its
positions), `mixture` (weights, seeded shard order), `packing` (lanes, samples), `state` (format, merge),
`loader` (background workers), `validation`, `counters`, `config` (`DataConfig`); `hgrn-data` is `__main__`.
"""
from hgrn_megatron.corpus.counters import DataCounters, flatten_stats
from hgrn_megatron.corpus.shards import SKIP_KINDS, DataError, resolve_shards

from .config import DataConfig, ShardGroupConfig
from .loader import TrainLoader
from .state import merge_data_states
from .validation import build_validation_batches

__all__ = [
    "SKIP_KINDS",
    "DataConfig",
    "DataCounters",
    "DataError",
    "ShardGroupConfig",
    "TrainLoader",
    "build_validation_batches",
    "flatten_stats",
    "merge_data_states",
    "resolve_shards",
]
