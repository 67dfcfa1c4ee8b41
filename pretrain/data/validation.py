"""Validation samples: fixed, from separate shards, identical at any data-parallel size, labelled by source.

The validation shards are read in sorted order, documents tokenized with EOS appended and packed exactly like
training samples (S + 1 tokens, stride S), up to `data.valid_samples` complete samples. Every token carries
the index of its document's source in `source_names`, so the loss can be reported overall and per source.
Rank r takes samples r, r + DP, ...; the last micro-batch of a rank may hold fewer rows.
"""
from __future__ import annotations

import logging

import numpy as np

from hgrn_megatron.corpus.counters import DataCounters
from hgrn_megatron.corpus.records import RecordParser, SkipWarner, iter_documents
from hgrn_megatron.corpus.shards import shard_display_names

from .batch import collate
from .config import DataConfig

log = logging.getLogger(__name__)

ENCODE_BATCH_DOCS = 32


def _read_validation_tokens(cfg: DataConfig, tokenizer, tokens_needed: int, counters: DataCounters):
    """Token, source-name and doc-start arrays of the first documents of the validation shards."""
    paths = cfg.resolve_valid()
    names = shard_display_names(paths)
    parser, warner = RecordParser(cfg.record_format()), SkipWarner(cfg.warn_limit)
    tokens, sources, total = [], [], 0

    def flush(batch):
        nonlocal total
        for ids, source in zip(tokenizer.encode_documents([d.text for d in batch]), (d.source for d in batch)):
            tokens.append(np.asarray(ids, dtype=np.int64))
            sources.append(source)
            total += len(ids)

    # Encode in growing batches (1, 2, 4, ... documents) so that little is encoded past what is needed.
    size = 1
    for path, name in zip(paths, names):
        batch = []
        for _, doc in iter_documents(path, parser, shard_name=name, counters=counters, warner=warner):
            batch.append(doc)
            if len(batch) == size:
                flush(batch)
                batch, size = [], min(2 * size, ENCODE_BATCH_DOCS)
                if total >= tokens_needed:
                    break
        if batch:
            flush(batch)
        if total >= tokens_needed:
            break
    return tokens, sources


def build_validation_batches(cfg: DataConfig, tokenizer, seq_length: int, micro_batch_size: int,
                             dp_rank: int = 0, dp_size: int = 1) -> dict:
    """This rank's validation micro-batches.

    Returns `{"batches": [{"tokens", "doc_start", "source_ids"}: Long/Bool/Long [rows <= mb, S+1]],
    "source_names": [...], "samples": global sample count, "skipped": {kind: n}}`. Loss per source:
    `batch.model_inputs(b).labels` come from the sources `batch.label_sources(b)`.
    """
    empty = {"batches": [], "source_names": [], "samples": 0, "skipped": {}}
    if not cfg.valid_shards or cfg.valid_samples == 0:
        return empty
    S = seq_length
    counters = DataCounters()
    docs, doc_sources = _read_validation_tokens(cfg, tokenizer, cfg.valid_samples * S + 1, counters)
    skipped = counters.summary()["skipped_by_kind"]
    if not docs:
        log.warning("data.valid_shards: no usable documents; validation is off")
        return {**empty, "skipped": skipped}
    stream = np.concatenate(docs)
    source_names = sorted(set(doc_sources))
    index = {name: i for i, name in enumerate(source_names)}
    source_ids = np.concatenate([np.full(len(d), index[s], dtype=np.int64) for d, s in zip(docs, doc_sources)])
    starts = np.zeros(len(stream), dtype=np.bool_)
    starts[np.cumsum([0] + [len(d) for d in docs[:-1]])] = True
    samples = min(cfg.valid_samples, (len(stream) - 1) // S)
    if samples < cfg.valid_samples and dp_rank == 0:
        log.warning("validation shards hold %d samples of %d tokens, fewer than data.valid_samples (%d)",
                    samples, S + 1, cfg.valid_samples)
    mine = list(range(dp_rank, samples, dp_size))
    batches = []
    for i in range(0, len(mine), micro_batch_size):
        rows = [slice(j * S, j * S + S + 1) for j in mine[i : i + micro_batch_size]]
        batches.append(collate([(stream[r], starts[r], source_ids[r]) for r in rows],
                               ("tokens", "doc_start", "source_ids")))
    return {"batches": batches, "source_names": source_names, "samples": samples, "skipped": skipped}
