"""Data-pipeline throughput against raw SentencePiece encoding of the same documents, in one process.

    python benchmarks/data_pipeline.py [--shards 'DIR/*.jsonl.zst'] [--tokenizer DIR] [--seq-length 2048]

Baseline: `encode` of every document of the shards, one at a time on one thread (the documents already in
memory), in tokens per second. Pipeline: a `TrainLoader` (DP 1) with 0, 1 and 2 background workers, consuming
samples until one pass's worth of tokens has been delivered, in delivered tokens per second; the pipeline pays
for decompression, JSON parsing, packing and the hand-over to the training process on top of the encoding.
Rounds alternate baseline and pipeline so that machine noise hits both; the median ratio is reported. Defaults
use the sample and tokenizer that ship in tests/assets.

    python benchmarks/data_pipeline.py --reshard [--shards ...] [--rss-mb 200]

`hgrn-data reshard` on one core against plain zstd (decompress the shards and compress the same text at the same
level, in one stream), in CPU seconds; then the peak RSS of resharding a generated input of 1/10 and of
`--rss-mb` MB of text, each in a fresh process (flat memory: the two peaks match).
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


def raw_encode_rate(encode, texts: list[str]) -> dict:
    """Tokens per second of `encode` (a document's ids, EOS included, as the pipeline packs them) over `texts`."""
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for text in texts:
        n += len(encode(text))
    return {"tokens_per_s": n / (time.perf_counter() - t0), "tokens_per_cpu_s": n / (time.process_time() - c0)}


def loading_cpu_s(loader) -> float:
    """CPU seconds (user + system) used so far by every process that loads: this one (which receives, unpickles
    and collates, or does everything with 0 workers) and each worker process (whose pickling and sending a
    per-sample timer inside the worker would miss). Process CPU time does not count the time a process waits for
    a core, so the figure holds on a machine busy with other work."""
    import psutil

    own = time.process_time()
    return own + sum(sum(psutil.Process(p.pid).cpu_times()[:2]) for p in loader._procs)


class RecordingTokenizer:
    """The tokenizer, noting every document the pipeline tokenizes while `recording` is set."""

    def __init__(self, tokenizer):
        self.tokenizer, self.sha256 = tokenizer, tokenizer.sha256
        self.recording, self.texts = False, []

    def encode_document_array(self, text: str):
        if self.recording:
            self.texts.append(text)
        return self.tokenizer.encode_document_array(text)


def window_documents(cfg, tokenizer, seq_length: int, micro_batch: int, steps: int) -> list[str]:
    """The documents the pipeline tokenizes while it delivers micro-batches steps + 1 .. 2 * steps (the timed
    window of `pipeline_rate`), in order: the baseline encodes exactly these. The sequence is the same for any
    worker count; this replays it in this process.

    They are not simply the shards' documents: with L lanes, the lanes read different units (or, with fewer units
    than lanes, the same unit in different passes), so a window sees the parts of the corpus the lanes are at.
    """
    from hgrn_megatron.pretrain.data import TrainLoader

    recorder = RecordingTokenizer(tokenizer)
    with TrainLoader(cfg.model_copy(update={"num_workers": 0}), recorder, seq_length, micro_batch, 0, 1) as loader:
        for step in range(2 * steps):
            recorder.recording = step >= steps
            next(loader)
    return recorder.texts


def pipeline_rate(cfg, tokenizer, seq_length: int, micro_batch: int, steps: int, window_tokens: int) -> dict:
    """Tokens per second (wall clock) and per CPU second of all the loading processes over a timed window.

    The first `steps` micro-batches are a warm-up: every lane starts by tokenizing a whole document of which it
    delivers only a part at first (L lanes hold about L half-documents of tokens in flight), so the start costs
    more than it delivers. The next `steps` are timed. Rates count `window_tokens`, the tokens of the documents
    the pipeline tokenizes in the window (`window_documents`), which the baseline encodes: both rates are then
    of the same work, and their ratio is the baseline's CPU time over the pipeline's. (Delivered tokens differ
    from them by the documents in flight at either end of the window.) A worker runs at most a message's worth
    of samples ahead when it is the bottleneck, as here, so its CPU time over the window is that of the window.
    """
    from hgrn_megatron.pretrain.data import TrainLoader

    with TrainLoader(cfg, tokenizer, seq_length, micro_batch, 0, 1) as loader:
        for _ in range(steps):
            next(loader)
        before = loader.stats()
        t0, c0 = time.perf_counter(), loading_cpu_s(loader)
        for _ in range(steps):
            next(loader)
        elapsed, cpu = time.perf_counter() - t0, loading_cpu_s(loader) - c0
        after = loader.stats()
    return {"tokens_per_s": window_tokens / elapsed, "wait_s": after["wait_s"] - before["wait_s"],
            "elapsed_s": elapsed, "tokens_per_cpu_s": window_tokens / cpu,
            # the workers' own timer around producing each sample (no hand-over): what `stats()` reports
            "tokens_per_produce_cpu_s": window_tokens / (after["loader_cpu_s"] - before["loader_cpu_s"])}


def plain_zstd_cpu_s(paths, level: int) -> tuple[float, int]:
    """CPU seconds to decompress `paths` and compress the text again in one stream; the text's size."""
    import zstandard

    from hgrn_megatron.corpus.shards import iter_decompressed

    c0 = time.process_time()
    text = 0
    for path in paths:
        cobj = zstandard.ZstdCompressor(level=level).compressobj()
        for data in iter_decompressed(path):
            text += len(data)
            cobj.compress(data)
        cobj.flush()
    return time.process_time() - c0, text


def reshard_cpu_s(paths, out: Path, level: int) -> float:
    from hgrn_megatron.corpus.reshard import reshard_one

    c0 = time.process_time()
    for path in paths:
        reshard_one(path, out / Path(path).name, level=level)
    return time.process_time() - c0


def write_synthetic_shard(path: Path, text_mb: int) -> None:
    """A shard of `text_mb` MB of varied JSON lines, written streaming (constant memory)."""
    import random

    import zstandard

    rng = random.Random(0)
    words = [f"w{i}" * (1 + i % 5) for i in range(5000)]
    with open(path, "wb") as fh, zstandard.ZstdCompressor(level=3).stream_writer(fh) as out:
        written = 0
        while written < text_mb * 1_000_000:
            text = " ".join(rng.choices(words, k=rng.randint(20, 4000)))
            line = json.dumps({"text": text, "meta": {"pile_set_name": "Synthetic"}}).encode() + b"\n"
            out.write(line)
            written += len(line)


def reshard_peak_rss_mib(path: Path, out: Path) -> float:
    """Peak RSS (MiB) of a fresh process that reshards `path`."""
    import subprocess

    code = ("import resource, sys; from hgrn_megatron.corpus.reshard import reshard_one; "
            "reshard_one(sys.argv[1], sys.argv[2]); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    res = subprocess.run([sys.executable, "-c", code, str(path), str(out)], check=True, capture_output=True, text=True)
    return int(res.stdout.split()[-1]) / 1024


def reshard_benchmark(shards: str, rounds: int, rss_mb: int) -> dict:
    import tempfile

    from hgrn_megatron.corpus.reshard import DEFAULT_LEVEL
    from hgrn_megatron.corpus.shards import resolve_shards

    paths = resolve_shards([shards], field="--shards")
    ratios, rates = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            plain, text = plain_zstd_cpu_s(paths, DEFAULT_LEVEL)
            out = Path(tmp) / f"round{r}"
            ours = reshard_cpu_s(paths, out, DEFAULT_LEVEL)
            ratios.append(plain / ours)
            rates.append(text / ours)
            print(f"round {r + 1}: plain zstd {text / plain / 1e6:.0f} MB/s, reshard {text / ours / 1e6:.0f} MB/s "
                  f"of text per CPU second ({plain / ours:.2f}x)")
        rss = {}
        for mb in (max(1, rss_mb // 10), rss_mb):
            src = Path(tmp) / f"synthetic-{mb}.jsonl.zst"
            write_synthetic_shard(src, mb)
            rss[mb] = reshard_peak_rss_mib(src, Path(tmp) / "rss-out" / src.name)
            print(f"reshard of {mb} MB of text: peak RSS {rss[mb]:.0f} MiB")
    summary = {"reshard_over_plain_zstd_cpu": statistics.median(ratios),
               "reshard_text_mb_per_cpu_s": statistics.median(rates) / 1e6,
               "hours_per_tb_one_core": 1e12 / statistics.median(rates) / 3600,
               "peak_rss_mib": {str(k): v for k, v in rss.items()}}
    print(json.dumps(summary, indent=1))
    print(f"reshard / plain zstd: {summary['reshard_over_plain_zstd_cpu']:.2f} per CPU second (goal >= 0.7)")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default=str(ROOT / "tests/assets/pile-mini/train-*.jsonl.zst"))
    ap.add_argument("--tokenizer", default=str(ROOT / "tests/assets/tokenizer"))
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--lanes", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--json", help="write the results here as JSON")
    ap.add_argument("--reshard", action="store_true", help="measure `hgrn-data reshard` instead (see above)")
    ap.add_argument("--rss-mb", type=int, default=200, help="text size of the generated input for the RSS check")
    args = ap.parse_args(argv)
    if args.reshard:
        summary = reshard_benchmark(args.shards, args.rounds, args.rss_mb)
    else:
        summary = pipeline_benchmark(args)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


def pipeline_benchmark(args) -> dict:
    from hgrn_megatron.corpus.records import RecordParser, iter_documents
    from hgrn_megatron.corpus.shards import resolve_shards
    from hgrn_megatron.pretrain.data import DataConfig
    from hgrn_megatron.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(args.tokenizer)
    paths = resolve_shards([args.shards], field="--shards")
    chars = sum(len(doc.text) for p in paths for _, doc in iter_documents(p, RecordParser()))
    # The timed window: about one pass's worth of tokens (at ~3.2 characters per token), after as many to warm up.
    steps = max(1, int(chars / 3.2) // (args.seq_length * args.micro_batch))
    cfg = DataConfig.build({"train_shards": [args.shards], "lanes": args.lanes, "num_workers": 0})
    texts = window_documents(cfg, tokenizer, args.seq_length, args.micro_batch, steps)
    window_tokens = steps * args.seq_length * args.micro_batch
    encoded = sum(len(tokenizer.encode_document_array(t)) for t in texts)
    print(f"{len(paths)} shards, {chars / 1e6:.1f} M characters; tokenizer {tokenizer.vocab_size} pieces; seq "
          f"{args.seq_length} x micro-batch {args.micro_batch}; {args.lanes} lanes; {os.cpu_count()} CPUs; timed "
          f"window: {window_tokens / 1e6:.2f} M tokens delivered, {len(texts)} documents ({len(set(texts))} distinct) "
          f"of {encoded / 1e6:.2f} M tokens tokenized; the baseline encodes those documents")
    # Two baselines: "raw", the cheapest way to have SentencePiece encode a document (ids into an int32 array,
    # EOS added by SentencePiece: what the pipeline calls), and "raw_list", ids as a Python list then EOS appended
    # (`encode_document`, the call form of earlier figures, which costs more per token).
    baselines = {"raw": tokenizer.encode_document_array, "raw_list": tokenizer.encode_document}
    results = {**{b: [] for b in baselines}, **{w: [] for w in args.workers}}
    for r in range(args.rounds):
        for name, encode in baselines.items():
            results[name].append(raw_encode_rate(encode, texts))
        for workers in args.workers:
            cfg_w = cfg.model_copy(update={"num_workers": workers})
            results[workers].append(pipeline_rate(cfg_w, tokenizer, args.seq_length, args.micro_batch, steps, encoded))
        raw = results["raw"][-1]
        print(f"round {r + 1}: raw {raw['tokens_per_s'] / 1e3:.0f}k tok/s, {raw['tokens_per_cpu_s'] / 1e3:.0f}k per "
              f"CPU s (list form {results['raw_list'][-1]['tokens_per_cpu_s'] / 1e3:.0f}k); pipeline " + ", ".join(
                  f"{w} workers {results[w][-1]['tokens_per_s'] / 1e3:.0f}k, "
                  f"{results[w][-1]['tokens_per_cpu_s'] / 1e3:.0f}k per CPU s "
                  f"({results[w][-1]['tokens_per_cpu_s'] / raw['tokens_per_cpu_s']:.2f}x)" for w in args.workers))
    summary = summarize(results, baselines, args.workers)
    print(json.dumps(summary, indent=1))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if 1 in args.workers:
        print(f"pipeline (1 worker) / raw encode per CPU second of all loading processes: median "
              f"{summary['ratio_1w_over_raw_cpu']:.2f}, min {summary['ratio_1w_over_raw_cpu_min']:.2f} "
              f"(goal >= 0.85); wall clock {summary['ratio_1w_over_raw_wall']:.2f}; load average {load:.1f}")
    return summary


def summarize(results: dict, baselines, workers) -> dict:
    summary = {}
    for name in baselines:
        summary[f"{name}_encode_tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in results[name])
        summary[f"{name}_encode_tokens_per_cpu_s"] = statistics.median(r["tokens_per_cpu_s"] for r in results[name])
    for w in workers:
        summary[f"pipeline_{w}w_tokens_per_s"] = statistics.median(p["tokens_per_s"] for p in results[w])
        # Each round's pipeline against the same round's baseline: load that varies between rounds hits both.
        for key, base, name in (("tokens_per_s", "raw", "wall"), ("tokens_per_cpu_s", "raw", "cpu"),
                                ("tokens_per_cpu_s", "raw_list", "cpu_vs_list"),
                                ("tokens_per_produce_cpu_s", "raw", "produce_cpu")):
            ratios = [p[key] / raw["tokens_per_s" if name == "wall" else "tokens_per_cpu_s"]
                      for p, raw in zip(results[w], results[base])]
            summary[f"ratio_{w}w_over_raw_{name}"] = statistics.median(ratios)
            summary[f"ratio_{w}w_over_raw_{name}_min"] = min(ratios)
            summary[f"ratio_{w}w_over_raw_{name}_rounds"] = [round(r, 3) for r in ratios]
    return summary


if __name__ == "__main__":
    sys.exit(main())
