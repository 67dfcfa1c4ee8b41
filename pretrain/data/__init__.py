"""hgrn_megatron.pretrain.data: Pile-format shards -> documents -> packed samples, deterministic and resumable.

    loader = TrainLoader(cfg.data, tokenizer, seq_length, micro_batch_size, dp_rank, dp_size, state=saved)
    batch = next(loader)            # {"tokens": Long[mb, S+1], "doc_start": Bool[mb, S+1]}
    x = model_inputs(batch)         # x.input_ids, x.labels, x.doc_start: [mb, S] each
    state = loader.state_dict()     # rank-local; merge_data_states([all ranks' states]) -> global state

Modules: `stream` (units of data, their seeded order, the lanes' readers), `mixture` (weights),
`packing` (lanes, samples), `state` (format, fingerprint, merge), `loader` (background workers), `batch` (the
batch contract), `validation`, `config` (`DataConfig`); `hgrn-data` is `__main__`. Shards are read and counted by
`hgrn_megatron.corpus`.
"""
from hgrn_megatron.corpus.counters import DataCounters
from hgrn_megatron.corpus.records import SKIP_KINDS, RecordFormat
from hgrn_megatron.corpus.shards import DataError, resolve_shards

from .batch import ModelInputs, label_sources, model_inputs
from .config import DataConfig, ShardGroupConfig
from .loader import TrainLoader, check_data_state
from .state import merge_data_states
from .validation import build_validation_batches

__all__ = [
    "SKIP_KINDS",
    "DataConfig",
    "DataCounters",
    "DataError",
    "ModelInputs",
    "RecordFormat",
    "ShardGroupConfig",
    "TrainLoader",
    "build_validation_batches",
    "check_data_state",
    "label_sources",
    "merge_data_states",
    "model_inputs",
    "resolve_shards",
]
