"""Validation samples: fixed, identical at any DP size, every token labelled with its document's source."""
from __future__ import annotations

import shutil

import numpy as np
import torch

from hgrn_megatron.corpus.records import RecordParser, iter_documents
from hgrn_megatron.pretrain.data import build_validation_batches
from tests.data.data_harness import ASSETS, data_config

VAL = str(ASSETS / "pile-mini" / "val.jsonl.zst")
S = 64


def global_samples(cfg, tokenizer, mb, dp):
    """All ranks' validation samples, back in global order."""
    outs = [build_validation_batches(cfg, tokenizer, S, mb, r, dp) for r in range(dp)]
    assert all(o["source_names"] == outs[0]["source_names"] for o in outs)
    rows = {}
    for r, out in enumerate(outs):
        tokens = torch.cat([b["tokens"] for b in out["batches"]])
        sources = torch.cat([b["source_ids"] for b in out["batches"]])
        starts = torch.cat([b["doc_start"] for b in out["batches"]])
        for k in range(len(tokens)):
            rows[r + k * dp] = (tokens[k], sources[k], starts[k])
    assert sorted(rows) == list(range(outs[0]["samples"]))
    return outs[0], [rows[j] for j in sorted(rows)]


def test_validation_is_the_same_at_any_dp_size(tokenizer):
    cfg = data_config(VAL, valid_shards=[VAL], valid_samples=21)
    ref_out, ref = global_samples(cfg, tokenizer, 4, 1)
    assert ref_out["samples"] == 21 and ref_out["skipped"] == {}
    assert len(ref_out["batches"][-1]["tokens"]) == 1  # 21 = 5 x 4 + 1: a short last micro-batch
    for dp, mb in [(2, 3), (4, 1), (3, 2)]:
        _, rows = global_samples(cfg, tokenizer, mb, dp)
        for a, b in zip(ref, rows):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_tokens_and_sources_follow_the_documents(tokenizer):
    cfg = data_config(VAL, valid_shards=[VAL], valid_samples=10_000)  # more than the shard holds: all of it
    out, rows = global_samples(cfg, tokenizer, 8, 1)
    docs = [d for _, d in iter_documents(VAL, RecordParser())]
    want_tokens = np.concatenate([np.array(tokenizer.encode(d.text) + [tokenizer.eos_id]) for d in docs])
    want_sources = np.concatenate(
        [np.full(len(tokenizer.encode(d.text)) + 1, out["source_names"].index(d.source)) for d in docs]
    )
    assert out["samples"] == (len(want_tokens) - 1) // S
    assert set(out["source_names"]) == {d.source for d in docs}
    for j, (tokens, sources, starts) in enumerate(rows):
        span = slice(j * S, j * S + S + 1)
        assert np.array_equal(tokens.numpy(), want_tokens[span])
        assert np.array_equal(sources.numpy(), want_sources[span])
        assert starts.dtype == torch.bool


def test_no_validation_shards_means_no_batches(tokenizer):
    out = build_validation_batches(data_config(VAL), tokenizer, S, 2, 0, 1)
    assert out["batches"] == [] and out["source_names"] == []


class CountingTokenizer:
    """The real tokenizer, counting the documents it encodes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.documents = tokenizer, 0
        self.sha256 = tokenizer.sha256

    def encode_documents(self, texts):
        self.documents += len(texts)
        return self.tokenizer.encode_documents(texts)


def test_the_validation_set_is_built_once_and_read_from_the_cache(tmp_path, tokenizer):
    shutil.copy(ASSETS / "pile-mini" / "val.jsonl.zst", tmp_path / "val.jsonl.zst")
    cfg = data_config(str(ASSETS / "pile-mini" / "train-*.jsonl.zst"), valid_shards=[str(tmp_path / "val.jsonl.zst")],
                      valid_samples=6)
    ref = build_validation_batches(cfg, tokenizer, 32, 4, 1, 2)
    counting = CountingTokenizer(tokenizer)
    first = build_validation_batches(cfg, counting, 32, 4, 1, 2, cache_dir=tmp_path / "cache")
    built = counting.documents
    again = build_validation_batches(cfg, counting, 32, 4, 1, 2, cache_dir=tmp_path / "cache")
    other_rank = build_validation_batches(cfg, counting, 32, 4, 0, 2, cache_dir=tmp_path / "cache")
    assert built > 0 and counting.documents == built  # read back, not tokenized again
    assert other_rank["samples"] == ref["samples"] == 6
    for got in (first, again):
        assert got["source_names"] == ref["source_names"] and got["skipped"] == ref["skipped"]
        assert len(got["batches"]) == len(ref["batches"])
        for a, b in zip(got["batches"], ref["batches"]):
            assert all(torch.equal(a[k], b[k]) for k in ("tokens", "doc_start", "source_ids"))
    assert len(list((tmp_path / "cache").glob("valid-*.npz"))) == 1
    build_validation_batches(cfg.model_copy(update={"valid_samples": 4}), counting, 32, 4, 0, 1,
                             cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("valid-*.npz"))) == 2 and counting.documents > built


def test_validation_samples_every_shard_not_the_first_ones_documents(tmp_path, tokenizer):
    """A validation set split into one shard per source: the samples hold documents of every source (one
    document from each shard in turn), where reading the shards in order filled them from the first shard."""
    from tests.data.data_harness import record, write_zst

    words = "the quick brown fox jumps over the lazy dog again and again".split()
    for source in ("ArXiv", "Github", "Wikipedia"):
        lines = [record(" ".join(words[(i + j) % len(words)] for j in range(40)), source) for i in range(50)]
        write_zst(tmp_path / f"{source}.jsonl.zst", lines)
    cfg = data_config(str(tmp_path / "*.jsonl.zst"), valid_shards=[str(tmp_path)], valid_samples=4)
    out = build_validation_batches(cfg, tokenizer, S, 4)
    used = set(torch.cat([b["source_ids"] for b in out["batches"]]).unique().tolist())
    assert out["source_names"] == ["ArXiv", "Github", "Wikipedia"] and used == {0, 1, 2}


def test_the_log_says_which_documents_and_sources_validation_covers(tmp_path, tokenizer, caplog):
    """The validation shard is read in file order: with data.valid_samples short of the set, the log names the
    few sources covered and says that the shard holds more; a set read whole says nothing of the kind."""
    import logging

    docs = [d.source for _, d in iter_documents(VAL, RecordParser(data_config(VAL).record_format()))]
    short = data_config(VAL, valid_shards=[VAL], valid_samples=4)
    with caplog.at_level(logging.INFO, logger="hgrn_megatron.pretrain.data.validation"):
        out = build_validation_batches(short, tokenizer, S, 4, cache_dir=tmp_path)
        build_validation_batches(short, tokenizer, S, 4, cache_dir=tmp_path)  # from the cache: the same line
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validation:")]
    assert out["source_names"] == [docs[0]] and len(lines) == 2 and lines[0] == lines[1]
    assert f"4 samples from 1 documents of 1 sources ({docs[0]})" in lines[0] and "hold more documents" in lines[0]
    caplog.clear()
    whole = data_config(VAL, valid_shards=[VAL], valid_samples=10_000)
    with caplog.at_level(logging.INFO, logger="hgrn_megatron.pretrain.data.validation"):
        out = build_validation_batches(whole, tokenizer, S, 4)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validation:")]
    assert f"from {len(docs)} documents of {len(set(docs))} sources" in line and "hold more" not in line


def test_the_quickstart_validates_on_every_source_of_its_validation_shard(tokenizer):
    """configs/quickstart.yaml's validation shard holds its sources one after another; data.valid_samples must
    reach the last of them, or val_loss is the loss of the first document only (32 samples: one Austen novel)."""
    from pathlib import Path

    from hgrn_megatron.pretrain.config import load_config

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "configs" / "quickstart.yaml", [f"tokenizer.model={ASSETS / 'tokenizer'}"])
    data = cfg.data.model_copy(update={
        "valid_shards": [str(root / p) for p in cfg.data.valid_shards],
        "train_shards": [str(root / p) for p in cfg.data.train_shards]})
    shard_sources = {d.source for path in data.resolve_valid()
                     for _, d in iter_documents(path, RecordParser(data.record_format()))}
    out = build_validation_batches(data, tokenizer, cfg.model.seq_length, cfg.train.micro_batch_size)
    used = {out["source_names"][i] for i in torch.cat([b["source_ids"] for b in out["batches"]]).unique().tolist()}
    assert used == shard_sources and out["samples"] == data.valid_samples
