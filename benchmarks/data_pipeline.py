"""Data-pipeline throughput against raw SentencePiece encoding of the same documents, in one process.

    python benchmarks/data_pipeline.py [--shards 'DIR/*.jsonl.zst'] [--tokenizer DIR] [--seq-length 2048]

Baseline: `encode` of every document of the shards, one at a time on one thread (the documents already in
memory), in tokens per second. Pipeline: a `TrainLoader` (DP 1) with 0, 1 and 2 background workers, consuming
samples until one pass's worth of tokens has been delivered, in delivered tokens per second; the pipeline pays
for decompression, JSON parsing, packing and the hand-over to the training process on top of the encoding.
Rounds alternate baseline and pipeline so that machine noise hits both; the median ratio is reported. Defaults
use the sample and tokenizer that ship in tests/assets.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def raw_encode_rate(tokenizer, texts: list[str]) -> float:
    t0 = time.perf_counter()
    n = 0
    for text in texts:
        n += len(tokenizer.encode(text)) + 1  # + EOS, as the pipeline packs it
    return n / (time.perf_counter() - t0)


def pipeline_rate(cfg, tokenizer, seq_length: int, micro_batch: int, tokens_target: int) -> dict:
    from hgrn_megatron.pretrain.data import TrainLoader

    loader = TrainLoader(cfg, tokenizer, seq_length, micro_batch, 0, 1)
    try:
        next(loader)  # workers started and warm
        steps = max(1, tokens_target // (seq_length * micro_batch))
        t0 = time.perf_counter()
        for _ in range(steps):
            next(loader)
        elapsed = time.perf_counter() - t0
        stats = loader.stats()
    finally:
        loader.close()
    return {"tokens_per_s": steps * micro_batch * seq_length / elapsed, "wait_s": stats["wait_s"],
            "loader_tokens_per_s": stats["loader_tokens_per_s"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default=str(ROOT / "tests/assets/pile-mini/train-*.jsonl.zst"))
    ap.add_argument("--tokenizer", default=str(ROOT / "tests/assets/tokenizer"))
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--lanes", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="write the results here as JSON")
    args = ap.parse_args(argv)

    from hgrn_megatron.pretrain.data import DataConfig
    from hgrn_megatron.pretrain.data.shards import RecordParser, iter_documents, resolve_shards
    from hgrn_megatron.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(args.tokenizer)
    paths = resolve_shards([args.shards], field="--shards")
    texts = [doc.text for p in paths for _, doc in iter_documents(p, RecordParser())]
    chars = sum(map(len, texts))
    print(f"{len(paths)} shards, {len(texts)} documents, {chars / 1e6:.1f} M characters; tokenizer "
          f"{tokenizer.vocab_size} pieces; seq {args.seq_length} x micro-batch {args.micro_batch}; "
          f"{args.lanes} lanes; {os.cpu_count()} CPUs")
    pass_tokens = int(chars / 3.2)  # about one pass at ~3.2 characters per token
    results = {"raw": [], 0: [], 1: [], 2: []}
    for r in range(args.rounds):
        results["raw"].append(raw_encode_rate(tokenizer, texts))
        for workers in (0, 1, 2):
            cfg = DataConfig.build({"train_shards": [args.shards], "lanes": args.lanes, "num_workers": workers})
            results[workers].append(pipeline_rate(cfg, tokenizer, args.seq_length, args.micro_batch, pass_tokens))
        print(f"round {r + 1}: raw {results['raw'][-1] / 1e3:.0f}k tok/s; pipeline "
              + ", ".join(f"{w} workers {results[w][-1]['tokens_per_s'] / 1e3:.0f}k" for w in (0, 1, 2)))

    ratios = {w: statistics.median(p["tokens_per_s"] / raw for p, raw in zip(results[w], results["raw"]))
              for w in (0, 1, 2)}
    summary = {
        "raw_encode_tokens_per_s": statistics.median(results["raw"]),
        **{f"pipeline_{w}_workers_tokens_per_s": statistics.median(p["tokens_per_s"] for p in results[w]) for w in (0, 1, 2)},
        **{f"ratio_{w}_workers_over_raw": ratios[w] for w in (0, 1, 2)},
        "trainer_wait_fraction_1_worker": statistics.median(
            p["wait_s"] / (pass_tokens / p["tokens_per_s"]) for p in results[1]
        ),
    }
    print(json.dumps(summary, indent=1))
    print(f"pipeline (1 worker) / raw encode = {ratios[1]:.2f}  (goal >= 0.85)")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
