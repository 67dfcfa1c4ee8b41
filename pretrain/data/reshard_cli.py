"""`hgrn-data reshard`: rewrite shards as independent zstd frames with a frame index beside each.

    hgrn-data reshard 'data/pile/train/*.jsonl.zst' --out data/pile-framed/train [--frame-mib 4] [--workers 8]

One output shard per input shard (same relative name under --out, `.jsonl` becoming `.jsonl.zst`), lines in the
same order, bytes unchanged. Input shards are spread over `--workers` processes; the progress bar counts
compressed input bytes. Rerunning after an interruption skips every finished shard (one whose index exists) and
redoes the others. Exit status: 0 when every shard was copied whole, 1 when an input stream was damaged (its
output holds what was readable; the index records the fault), 2 for a bad path or option.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import sys
import time
from pathlib import Path

from tqdm import tqdm

from hgrn_megatron.corpus.reshard import DEFAULT_FRAME_BYTES, DEFAULT_LEVEL, ReshardResult, reshard_one
from hgrn_megatron.corpus.shards import DataError, resolve_shards, shard_display_names

_progress: queue.Queue | None = None


def output_name(name: str) -> str:
    """The output shard's relative name: always zstd."""
    for suffix in (".jsonl.zstd", ".jsonl.zst", ".jsonl"):
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".jsonl.zst"
    raise ValueError(f"not a shard name: {name}")


def _init_worker(progress) -> None:
    global _progress
    _progress = progress


def _report(n: int) -> None:
    if _progress is not None:
        _progress.put(n)


def _job(args) -> ReshardResult:
    source, output, frame_bytes, level = args
    return reshard_one(source, output, frame_bytes, level, on_read=_report)


def reshard_shards(paths: list[Path], out: Path, frame_bytes: int = DEFAULT_FRAME_BYTES, workers: int = 1,
                   level: int = DEFAULT_LEVEL, progress: bool = True) -> list[ReshardResult]:
    """Reshard every path into `out`, `workers` shards at a time; results in input order."""
    names = [output_name(n) for n in shard_display_names(paths)]
    jobs = [(str(p), str(out / n), frame_bytes, level) for p, n in zip(paths, names)]
    total = sum(os.path.getsize(p) for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc="resharding", disable=not progress) as bar:
        if workers <= 1:
            _init_worker(None)
            return [reshard_one(s, o, f, lv, on_read=bar.update) for s, o, f, lv in jobs]
        ctx = multiprocessing.get_context("spawn")  # no inherited state (threads, open shards) in the workers
        updates = ctx.Manager().Queue()
        with ctx.Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(updates,)) as pool:
            pending = pool.map_async(_job, jobs, chunksize=1)
            while not pending.ready():
                _drain(updates, bar)
                time.sleep(0.2)
            _drain(updates, bar)
            return pending.get()


def _drain(updates, bar) -> None:
    while True:
        try:
            bar.update(updates.get_nowait())
        except queue.Empty:
            return


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hgrn-data reshard", description=__doc__.splitlines()[0])
    ap.add_argument("shards", nargs="+", help="globs, directories or files of *.jsonl[.zst]")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--frame-mib", type=float, default=DEFAULT_FRAME_BYTES / (1 << 20),
                    help="text per frame (MiB, before compression); frames end at the first line end after it")
    ap.add_argument("--workers", type=int, default=1, help="input shards resharded at once (processes)")
    ap.add_argument("--level", type=int, default=DEFAULT_LEVEL, help="zstd compression level")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        if args.frame_mib <= 0 or args.workers < 1:
            raise ValueError(f"--frame-mib must be > 0 and --workers >= 1 (got {args.frame_mib}, {args.workers})")
        paths = resolve_shards(args.shards, field="shards")
        out = Path(args.out)
        if any(out.resolve() == p.parent for p in paths):
            raise ValueError(f"--out {out} is where input shards are; choose another directory")
    except (DataError, ValueError) as err:
        print(f"hgrn-data: error: {err}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results = reshard_shards(paths, out, int(args.frame_mib * (1 << 20)), args.workers, args.level,
                             progress=not args.quiet)
    faults = [r for r in results if r.fault]
    for r in faults:
        print(f"hgrn-data: {r.source}: {r.fault['kind']} ({r.fault['detail']}); {r.output} holds the "
              f"{r.lines:,} lines before it", file=sys.stderr)
    done = [r for r in results if not r.skipped]
    text = sum(r.text_bytes for r in done)
    print(f"reshard: {len(results)} shards ({len(results) - len(done)} already done), "
          f"{sum(r.lines for r in results):,} lines, {sum(r.frames for r in results):,} frames; "
          f"{text / 1e6:.1f} MB of text in {time.perf_counter() - t0:.1f} s; every frame verified", file=sys.stderr)
    return 1 if faults else 0
