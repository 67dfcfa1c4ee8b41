"""Helpers for the data tests: writing real shards (good and deliberately broken) and collecting global streams."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import zstandard

from hgrn_megatron.pretrain.data import SKIP_KINDS, DataConfig, TrainLoader, merge_data_states

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SHARED_PILE = Path(__file__).resolve().parents[3] / "shared" / "data" / "pile-sample"

WORDS = ["the", "of", "and", "to", "in", "is", "was", "he", "for", "it", "with", "as", "his", "on", "be", "at", "by", "had", "are", "but", "from", "or", "have", "an", "they", "which", "one", "you", "were", "her", "all", "she", "there", "would", "their", "we", "him", "been", "has", "when", "who", "will", "more", "no", "if", "out", "so", "said", "what", "up", "its", "about", "into", "than", "them", "can", "only", "other", "new", "some", "could", "time", "these", "two", "may", "then", "do", "first", "any", "my", "now", "such", "like", "river", "stone", "lantern", "orbit", "copper", "meadow", "quartz", "velvet", "harbor", "signal", "ember", "willow", "falcon"]


def make_text(rng: random.Random, min_words: int, max_words: int, tag: str) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
    # Line breaks, digits and a non-ASCII character now and then, as in real text.
    for i in range(8, len(words), rng.randint(9, 15)):
        words[i] += "\n"
    return f"{tag} " + " ".join(words) + rng.choice(["", ".", " 42.", " café."])


def record(text, source: str | None = "Synthetic") -> bytes:
    obj = {"text": text}
    if source is not None:
        obj["meta"] = {"pile_set_name": source}
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def write_zst(path: Path, lines: list[bytes], frames: int = 1) -> Path:
    """Lines as JSON Lines in `frames` zstd frames (real shards may hold several)."""
    data_parts = np.array_split(np.arange(len(lines)), frames)
    out = b"".join(
        zstandard.ZstdCompressor(level=3).compress(b"".join(lines[i] + b"\n" for i in part)) for part in data_parts
    )
    path.write_bytes(out)
    return path


def write_corpus(root: Path, shard_docs=(23, 17, 31), seed: int = 0, min_words=4, max_words=90) -> dict:
    """Shards of synthetic documents from three sources; returns {"glob", "docs": [[(text, source)] per shard]}."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sources = ["Source-A", "Source-B", "Source-C"]
    docs = []
    for s, n in enumerate(shard_docs):
        shard = [(make_text(rng, min_words, max_words, f"s{s}d{i}"), rng.choice(sources)) for i in range(n)]
        docs.append(shard)
        write_zst(root / f"shard-{s:02d}.jsonl.zst", [record(t, src) for t, src in shard], frames=1 + s % 2)
    return {"glob": str(root / "shard-*.jsonl.zst"), "docs": docs, "root": root}


def data_config(shards, **overrides) -> DataConfig:
    tree = {"train_shards": [shards] if isinstance(shards, str) else list(shards), "lanes": 8, "num_workers": 0,
            "prefetch": 4, **overrides}
    return DataConfig.build(tree)


def run_ranks(cfg: DataConfig, tokenizer, seq_length: int, mb: int, dp: int, steps: int, state=None, workers=None):
    """Run `dp` rank loaders (in this process) for `steps` micro-batches each.

    Returns (tokens [n, S+1], doc_start [n, S+1]) in global sample order, the merged state and per-rank stats
    (each with its `lane_counts`).
    """
    if workers is not None:
        cfg = cfg.model_copy(update={"num_workers": workers})
    per_rank, states, stats = [], [], []
    for r in range(dp):
        loader = TrainLoader(cfg, tokenizer, seq_length, mb, r, dp, state=state)
        try:
            batches = [next(loader) for _ in range(steps)]
            states.append(loader.state_dict())
            stats.append({**loader.stats(), "lane_counts": loader.lane_counts(SKIP_KINDS)})
        finally:
            loader.close()
        toks = np.concatenate([b["tokens"].numpy() for b in batches])
        starts = np.concatenate([b["doc_start"].numpy() for b in batches])
        per_rank.append((toks, starts))
    n = steps * mb
    tokens = np.empty((n * dp, seq_length + 1), dtype=np.int64)
    doc_start = np.empty((n * dp, seq_length + 1), dtype=bool)
    for r, (toks, starts) in enumerate(per_rank):
        tokens[r::dp] = toks
        doc_start[r::dp] = starts
    return tokens, doc_start, merge_data_states(states), stats
