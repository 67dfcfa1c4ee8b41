"""Data-pipeline throughput against raw SentencePiece encoding of the same documents, in one process.

    python benchmarks/data_pipeline.py [--shards 'DIR/*.jsonl.zst'] [--tokenizer DIR] [--seq-length 2048]

A `TrainLoader` (DP 1) with 0, 1 and 2 background workers against raw SentencePiece encoding of exactly the
documents the loader tokenizes while it delivers a timed window of whole passes (at least 3 M tokens; after as
many to warm up), one at a time on one thread, already in memory. The baseline is the cheapest call: ids written by
SentencePiece into an int32 array, EOS included (`Tokenizer.encode_document_array`); the list form
(`encode_document`) is reported beside it. The pipeline's cost is the CPU time of every process that loads: the
workers (decompression, JSON parsing, encoding, packing, pickling and sending) and the trainer (receiving,
unpickling, collating). Within a round the baseline and the pipeline alternate in `--slices` slices over the
same documents, so that load from other jobs weighs on both alike; each round starts a fresh loader; the median
and minimum ratio over `--rounds` rounds are reported. Defaults use the sample and tokenizer in tests/assets.

    python benchmarks/data_pipeline.py --reshard [--shards ...] [--rss-mb 200]

`hgrn-data reshard` on one core against plain zstd (decompress the shards and compress the same text at the same
level, in one stream), in CPU seconds; then the peak RSS of resharding a generated input of 1/10 and of
`--rss-mb` MB of text, each in a fresh process (flat memory: the two peaks match).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def raw_encode_cpu_s(encode, texts: list[str]) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, tokens) of `encode` (a document's ids, EOS included) over `texts`."""
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for text in texts:
        n += len(encode(text))
    return time.process_time() - c0, time.perf_counter() - t0, n


def workers_cpu_s(loader) -> float:
    """CPU seconds (user + system) used so far by the loader's worker processes: a timer inside a worker would
    miss its pickling and sending. Process CPU time leaves out the time a process waits for a core."""
    import psutil

    return sum(sum(psutil.Process(p.pid).cpu_times()[:2]) for p in loader._procs)


class RecordingTokenizer:
    """The tokenizer, noting which documents the pipeline tokenizes for each micro-batch while `step` is set."""

    def __init__(self, tokenizer):
        self.tokenizer, self.sha256 = tokenizer, tokenizer.sha256
        self.step, self.texts = None, {}

    def encode_document_array(self, text: str):
        if self.step is not None:
            self.texts.setdefault(self.step, []).append(text)
        return self.tokenizer.encode_document_array(text)


def window_documents(cfg, tokenizer, seq_length: int, micro_batch: int, steps: int) -> list[list[str]]:
    """For each micro-batch steps + 1 .. 2 * steps (the timed window), the documents the pipeline tokenizes to
    deliver it, in order: the baseline encodes exactly these. The sequence is the same for any worker count; this
    replays it in this process. They are not simply the shards' documents: with L lanes, the lanes read different
    units (or, with fewer units than lanes, the same unit in different passes)."""
    from hgrn_megatron.pretrain.data import TrainLoader

    recorder = RecordingTokenizer(tokenizer)
    with TrainLoader(cfg.model_copy(update={"num_workers": 0}), recorder, seq_length, micro_batch, 0, 1) as loader:
        for step in range(2 * steps):
            recorder.step = step - steps if step >= steps else None
            next(loader)
    return [recorder.texts.get(step, []) for step in range(steps)]


def interleaved_round(cfg, tokenizer, seq_length: int, micro_batch: int, docs: list[list[str]],
                      slices: int) -> dict:
    """One round: a fresh loader warmed up for len(docs) micro-batches, then the timed window in `slices` slices,
    each slice the baseline encoding the slice's documents and then the pipeline delivering the slice's
    micro-batches, so that whatever else the machine runs weighs on both alike.

    The warm-up: every lane starts by tokenizing a whole document of which it delivers only a part at first
    (L lanes hold about L half-documents of tokens in flight), so the start costs more than it delivers. Both
    sides count the tokens of the window's documents: the ratio of rates is the baseline's CPU time over the
    pipeline's for the same documents. The pipeline's CPU is this process's during its slices (receiving,
    unpickling, collating; everything with 0 workers) plus the workers' over the whole window: a worker, the
    bottleneck here, runs at most a message's worth of samples ahead of the trainer at either end of it.
    """
    from hgrn_megatron.pretrain.data import TrainLoader

    steps = len(docs)
    bounds = [round(k * steps / slices) for k in range(slices + 1)]
    raw_cpu = raw_wall = pipe_cpu = pipe_wall = 0.0
    with TrainLoader(cfg, tokenizer, seq_length, micro_batch, 0, 1) as loader:
        for _ in range(steps):
            next(loader)
        workers0 = workers_cpu_s(loader)
        for lo, hi in zip(bounds, bounds[1:]):
            cpu, wall, _ = raw_encode_cpu_s(tokenizer.encode_document_array, [t for d in docs[lo:hi] for t in d])
            raw_cpu, raw_wall = raw_cpu + cpu, raw_wall + wall
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(lo, hi):
                next(loader)
            pipe_cpu, pipe_wall = pipe_cpu + time.process_time() - c0, pipe_wall + time.perf_counter() - t0
        pipe_cpu += workers_cpu_s(loader) - workers0
    tokens = sum(len(tokenizer.encode_document_array(t)) for d in docs for t in d)
    return {"raw_tokens_per_cpu_s": tokens / raw_cpu, "raw_tokens_per_s": tokens / raw_wall,
            "tokens_per_cpu_s": tokens / pipe_cpu, "tokens_per_s": tokens / pipe_wall,
            "ratio_cpu": raw_cpu / pipe_cpu, "ratio_wall": raw_wall / pipe_wall}


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
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--window-passes", type=float, help="length of the timed window in passes (default: 3 M tokens)")
    ap.add_argument("--slices", type=int, default=10, help="baseline and pipeline alternate this often per round")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--json", help="write the results here as JSON")
    ap.add_argument("--as-given", action="store_true",
                    help="read the shards as they are, without resharding them into at least --lanes frames")
    ap.add_argument("--reshard", action="store_true", help="measure `hgrn-data reshard` instead (see above)")
    ap.add_argument("--rss-mb", type=int, default=200, help="text size of the generated input for the RSS check")
    args = ap.parse_args(argv)
    if args.reshard:
        summary = reshard_benchmark(args.shards, args.rounds, args.rss_mb)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            args.scratch = Path(scratch)
            summary = pipeline_benchmark(args)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


def framed_for_lanes(paths: list, chars: int, lanes: int, scratch: Path) -> str | None:
    """The shards resharded into frames of about chars / (2 x lanes) characters, so that every lane owns its
    units, as a real run is set up (DATA.md); with fewer units than lanes, lanes share units and each decompresses
    all of a shared unit. Returns the glob of the framed copy (None: the shards have enough units already)."""
    from hgrn_megatron.corpus.reshard import reshard_one
    from hgrn_megatron.pretrain.data.stream import UnitTable

    if len(UnitTable(paths, 0)) >= lanes:
        return None
    out = scratch / "framed"
    out.mkdir(parents=True, exist_ok=True)
    frame_bytes = max(16 << 10, chars // (2 * lanes))
    for path in paths:
        reshard_one(path, out / Path(path).name, frame_bytes=frame_bytes)
    print(f"resharded into {len(UnitTable(sorted(out.glob('*.jsonl.zst')), 0))} frames of ~{frame_bytes >> 10} KiB "
          f"for {lanes} lanes (--as-given: measure the shards as they are)")
    return str(out / "*.jsonl.zst")


def pipeline_benchmark(args) -> dict:
    from hgrn_megatron.corpus.records import RecordParser, iter_documents
    from hgrn_megatron.corpus.shards import resolve_shards
    from hgrn_megatron.pretrain.data import DataConfig
    from hgrn_megatron.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(args.tokenizer)
    paths = resolve_shards([args.shards], field="--shards")
    chars = sum(len(doc.text) for p in paths for _, doc in iter_documents(p, RecordParser()))
    if not args.as_given:
        args.shards = framed_for_lanes(paths, chars, args.lanes, args.scratch) or args.shards
    # The timed window: `--window-passes` passes' worth of tokens (at ~3.2 characters per token; by default as many
    # whole passes as make 3 M tokens), after as many to warm up. A short window is biased: a worker runs up to a
    # message or `prefetch` samples ahead of the trainer at the window's ends, which shifts the documents it
    # tokenizes in the window (measured on pile-mini: 0.86 with one pass of 0.76 M tokens, 0.90 with four).
    pass_tokens = chars / 3.2
    passes = args.window_passes or math.ceil(3e6 / pass_tokens)
    steps = max(1, int(passes * pass_tokens) // (args.seq_length * args.micro_batch))
    cfg = DataConfig.build({"train_shards": [args.shards], "lanes": args.lanes, "num_workers": 0})
    docs = window_documents(cfg, tokenizer, args.seq_length, args.micro_batch, steps)
    texts = [t for d in docs for t in d]
    print(f"{len(paths)} shards, {chars / 1e6:.1f} M characters; tokenizer {tokenizer.vocab_size} pieces; seq "
          f"{args.seq_length} x micro-batch {args.micro_batch}; {args.lanes} lanes; {os.cpu_count()} CPUs; timed "
          f"window: {steps * args.seq_length * args.micro_batch / 1e6:.2f} M tokens delivered, {len(texts)} "
          f"documents ({len(set(texts))} distinct) tokenized, which the baseline encodes; load average "
          f"{os.getloadavg()[0]:.1f}")
    results = {"list_over_array": [], **{w: [] for w in args.workers}}
    for r in range(args.rounds):
        # Ids as a Python list then EOS appended (`encode_document`, the call form of earlier figures) against
        # ids written by SentencePiece into an int32 array with EOS (the baseline: what the pipeline calls).
        results["list_over_array"].append(list_over_array_rate(tokenizer, docs, args.slices))
        for w in args.workers:
            cfg_w = cfg.model_copy(update={"num_workers": w})
            results[w].append(interleaved_round(cfg_w, tokenizer, args.seq_length, args.micro_batch, docs,
                                                args.slices))
        print(f"round {r + 1}: " + "; ".join(
            f"{w} workers: {results[w][-1]['tokens_per_cpu_s'] / 1e3:.0f}k tok per CPU s, raw "
            f"{results[w][-1]['raw_tokens_per_cpu_s'] / 1e3:.0f}k, ratio {results[w][-1]['ratio_cpu']:.3f} "
            f"(wall {results[w][-1]['ratio_wall']:.2f})" for w in args.workers)
            + f"; load average {os.getloadavg()[0]:.1f}")
    summary = summarize(results, args.workers)
    print(json.dumps(summary, indent=1))
    if 1 in args.workers:
        print(f"pipeline (1 worker) / raw encode per CPU second of all loading processes: median "
              f"{summary['ratio_1w_cpu']:.3f}, min {summary['ratio_1w_cpu_min']:.3f} (goal >= 0.85)")
    return summary


def list_over_array_rate(tokenizer, docs: list[list[str]], slices: int) -> float:
    """Tokens per CPU second of `encode_document` (ids as a Python list, EOS appended; the pipeline's call form
    before) over that of `encode_document_array`, alternating in slices over the same documents."""
    bounds = [round(k * len(docs) / slices) for k in range(slices + 1)]
    array_cpu = list_cpu = 0.0
    for lo, hi in zip(bounds, bounds[1:]):
        texts = [t for d in docs[lo:hi] for t in d]
        array_cpu += raw_encode_cpu_s(tokenizer.encode_document_array, texts)[0]
        list_cpu += raw_encode_cpu_s(tokenizer.encode_document, texts)[0]
    return array_cpu / list_cpu


def summarize(results: dict, workers) -> dict:
    summary = {"raw_list_form_rate_over_array_form": statistics.median(results["list_over_array"])}
    for w in workers:
        rounds = results[w]
        summary[f"raw_{w}w_tokens_per_cpu_s"] = statistics.median(r["raw_tokens_per_cpu_s"] for r in rounds)
        summary[f"pipeline_{w}w_tokens_per_cpu_s"] = statistics.median(r["tokens_per_cpu_s"] for r in rounds)
        summary[f"pipeline_{w}w_tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in rounds)
        for name in ("cpu", "wall"):
            ratios = [r[f"ratio_{name}"] for r in rounds]
            summary[f"ratio_{w}w_{name}"] = statistics.median(ratios)
            summary[f"ratio_{w}w_{name}_min"] = min(ratios)
            summary[f"ratio_{w}w_{name}_rounds"] = [round(x, 3) for x in ratios]
    return summary


if __name__ == "__main__":
    sys.exit(main())
