"""Validation samples: fixed, from separate shards, identical at any data-parallel size, labelled by source.

The validation shards are read round-robin, one document from each shard in turn (shards in sorted order), so
that a validation set split by source or by shard samples all of them rather than the first shard's first
documents; documents are tokenized with EOS appended and packed exactly like training samples (S + 1 tokens,
stride S), up to `data.valid_samples` complete samples. Every token carries
the index of its document's source in `source_names`, so the loss can be reported overall and per source.
Rank r takes samples r, r + DP, ...; the last micro-batch of a rank may hold fewer rows.

With a `cache_dir`, the packed validation set is written there once (`valid-<key>.npz`, tmp + rename) and read
back by every later build whose key matches: a hash of the validation shards (paths, sizes, modification
times), the tokenizer's sha256, the sequence length, `data.valid_samples` and the record format. Start-up then
reads a small file instead of tokenizing the validation documents on every rank.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from hgrn_megatron.corpus.counters import DataCounters
from hgrn_megatron.corpus.records import RecordParser, SkipWarner, iter_documents
from hgrn_megatron.corpus.shards import shard_display_names

from .batch import collate
from .config import DataConfig

log = logging.getLogger(__name__)

ENCODE_BATCH_DOCS = 32


def _read_validation_tokens(cfg: DataConfig, tokenizer, tokens_needed: int, counters: DataCounters):
    """Token and source-name arrays of the first documents of the validation shards (round-robin), and whether
    the shards hold documents past them (which `data.valid_samples` then leaves out)."""
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
    size, batch = 1, []
    documents = _round_robin([iter_documents(path, parser, shard_name=name, counters=counters, warner=warner)
                              for path, name in zip(paths, names)])
    for doc in documents:
        batch.append(doc)
        if len(batch) == size:
            flush(batch)
            batch, size = [], min(2 * size, ENCODE_BATCH_DOCS)
            if total >= tokens_needed:
                break
    if batch and total < tokens_needed:
        flush(batch)
        batch = []
    more = bool(batch) or next(documents, None) is not None  # at most one more record parsed to know
    return tokens, sources, more


def _round_robin(readers):
    """Documents from each reader in turn (a reader that runs out drops out), deterministically."""
    readers = list(readers)
    while readers:
        for reader in list(readers):
            item = next(reader, None)
            if item is None:
                readers.remove(reader)
            else:
                yield item[1]


def _cache_key(cfg: DataConfig, tokenizer, seq_length: int) -> str:
    shards = []
    for path in cfg.resolve_valid():
        st = os.stat(path)
        shards.append([str(path), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"order": "round-robin", "shards": shards, "tokenizer": tokenizer.sha256,
                       "seq_length": seq_length, "samples": cfg.valid_samples,
                       "format": dataclasses.asdict(cfg.record_format())},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _packed_validation(cfg: DataConfig, tokenizer, S: int) -> dict | None:
    """The packed validation stream: tokens, doc starts, source ids, source names, samples, skips."""
    counters = DataCounters()
    docs, doc_sources, more = _read_validation_tokens(cfg, tokenizer, cfg.valid_samples * S + 1, counters)
    skipped = counters.summary()["skipped_by_kind"]
    if not docs:
        return {"skipped": skipped, "samples": 0, "source_names": [], "documents": False}
    stream = np.concatenate(docs)
    source_names = sorted(set(doc_sources))
    index = {name: i for i, name in enumerate(source_names)}
    source_ids = np.concatenate([np.full(len(d), index[s], dtype=np.int64) for d, s in zip(docs, doc_sources)])
    starts = np.zeros(len(stream), dtype=np.bool_)
    starts[np.cumsum([0] + [len(d) for d in docs[:-1]])] = True
    samples = min(cfg.valid_samples, (len(stream) - 1) // S)
    end = samples * S + 1  # only what the samples use
    used = int(starts[:end].sum())  # documents that reach the samples, and their sources
    used_sources = [source_names[i] for i in np.unique(source_ids[:end]).tolist()]
    return {"tokens": stream[:end], "starts": starts[:end], "source_ids": source_ids[:end],
            "source_names": source_names, "samples": samples, "skipped": skipped, "documents": True,
            "coverage": {"documents": used, "sources": used_sources, "more": more or used < len(docs)}}


def _cached_validation(cfg: DataConfig, tokenizer, S: int, cache_dir: str | Path | None) -> dict:
    if cache_dir is None:
        return _packed_validation(cfg, tokenizer, S)
    path = Path(cache_dir) / f"valid-{_cache_key(cfg, tokenizer, S)}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if not meta["documents"]:
                return meta
            return {**meta, "tokens": z["tokens"], "starts": z["starts"], "source_ids": z["source_ids"]}
    packed = _packed_validation(cfg, tokenizer, S)
    meta = {k: packed[k] for k in ("samples", "skipped", "source_names", "documents", "coverage") if k in packed}
    arrays = {k: packed[k] for k in ("tokens", "starts", "source_ids") if k in packed}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, meta=np.array(json.dumps(meta)), **arrays)
    os.replace(tmp, path)
    return packed


def log_coverage(packed: dict, valid_samples: int) -> None:
    """Say what the validation loss covers: documents are taken in file order (round-robin over shards), so
    with `data.valid_samples` smaller than the set, a shard grouped by source is covered by its first sources
    only; `val_loss/<source>` then exists only for those."""
    coverage = packed.get("coverage")
    if coverage is None:  # a cache written before coverage was recorded
        return
    names = coverage["sources"]
    log.info("validation: %d samples from %d documents of %d sources (%s)%s", packed["samples"],
             coverage["documents"], len(names), ", ".join(names),
             f"; the shards hold more documents, which data.valid_samples ({valid_samples}) leaves out: they are "
             "read in file order, round-robin over the shards" if coverage["more"] else "")


def build_validation_batches(cfg: DataConfig, tokenizer, seq_length: int, micro_batch_size: int,
                             dp_rank: int = 0, dp_size: int = 1, cache_dir: str | Path | None = None) -> dict:
    """This rank's validation micro-batches (read from `cache_dir` when a matching build was cached there).

    Returns `{"batches": [{"tokens", "doc_start", "source_ids"}: Long/Bool/Long [rows <= mb, S+1]],
    "source_names": [...], "samples": global sample count, "skipped": {kind: n}}`. Loss per source:
    `batch.model_inputs(b).labels` come from the sources `batch.label_sources(b)`.
    """
    empty = {"batches": [], "source_names": [], "samples": 0, "skipped": {}}
    if not cfg.valid_shards or cfg.valid_samples == 0:
        return empty
    S = seq_length
    packed = _cached_validation(cfg, tokenizer, S, cache_dir)
    skipped = packed["skipped"]
    if not packed["documents"]:
        log.warning("data.valid_shards: no usable documents; validation is off")
        return {**empty, "skipped": skipped}
    stream, starts, source_ids = packed["tokens"], packed["starts"], packed["source_ids"]
    samples = packed["samples"]
    if samples < cfg.valid_samples and dp_rank == 0:
        log.warning("validation shards hold %d samples of %d tokens, fewer than data.valid_samples (%d)",
                    samples, S + 1, cfg.valid_samples)
    if dp_rank == 0:
        log_coverage(packed, cfg.valid_samples)
    mine = list(range(dp_rank, samples, dp_size))
    batches = []
    for i in range(0, len(mine), micro_batch_size):
        rows = [slice(j * S, j * S + S + 1) for j in mine[i : i + micro_batch_size]]
        batches.append(collate([(stream[r], starts[r], source_ids[r]) for r in rows],
                               ("tokens", "doc_start", "source_ids")))
    return {"batches": batches, "source_names": packed["source_names"], "samples": samples, "skipped": skipped}
