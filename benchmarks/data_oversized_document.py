"""What one very long document costs a data worker, with and without `data.max_document_bytes`.

    python benchmarks/data_oversized_document.py [--doc-mb 50] [--tokenizer DIR] [--json out.json]

Writes a shard of short documents with one long document (random words) in the middle, then, in a fresh
process per case, reads it through a `TrainLoader` (one lane, loading in-process, as a worker does) until every
short document has been packed: peak RSS of that process (ru_maxrss) and wall time. Cases: the long document
read (no limit), the same shard under the default limit (the document is skipped unparsed), and a document just
under the default limit (the most a worker pays for one document by default).
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the of and to in is was he for it with as his on be at by had are but from or have an they which one "
         "river stone lantern orbit copper meadow quartz velvet harbor signal ember willow falcon").split()
SHORT_DOCS = 200


def write_shard(path: Path, doc_bytes: int) -> None:
    import zstandard

    rng = random.Random(0)

    def line(n_bytes: int) -> bytes:
        words = rng.choices(WORDS, k=max(1, n_bytes // 5))
        return json.dumps({"text": " ".join(words), "meta": {"pile_set_name": "Bench"}}).encode()

    lines = [line(2000) for _ in range(SHORT_DOCS)]
    lines.insert(SHORT_DOCS // 2, line(doc_bytes))
    with open(path, "wb") as fh, zstandard.ZstdCompressor(level=3).stream_writer(fh) as out:
        for data in lines:
            out.write(data + b"\n")


def child(shard: str, tokenizer_dir: str, limit: int) -> None:
    """Consume samples until every document is packed; print peak RSS and wall seconds as JSON."""
    from hgrn_megatron.pretrain.data import DataConfig, TrainLoader
    from hgrn_megatron.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    cfg = DataConfig.build({"train_shards": [shard], "lanes": 1, "num_workers": 0, "max_document_bytes": limit})
    start = time.perf_counter()
    with TrainLoader(cfg, tokenizer, 2048, 1, 0, 1) as loader:
        while loader.stats()["documents"] + loader.stats()["skipped_total"] < SHORT_DOCS + 1:
            next(loader)
        stats = loader.stats()
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mib": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024, "skipped": stats["skipped_by_kind"]}))


def run_case(shard: Path, tokenizer_dir: str, limit: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", str(shard), "--tokenizer", tokenizer_dir,
                           "--limit", str(limit)], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    from hgrn_megatron.corpus import DEFAULT_FORMAT

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doc-mb", type=float, default=50)
    ap.add_argument("--tokenizer", default=str(ROOT / "tests/assets/tokenizer"))
    ap.add_argument("--json", help="write the results here as JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.tokenizer, args.limit)
        return 0
    default = DEFAULT_FORMAT.max_document_bytes
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        long_shard, at_limit_shard = Path(tmp, "long.jsonl.zst"), Path(tmp, "at-limit.jsonl.zst")
        write_shard(long_shard, int(args.doc_mb * 1e6))
        write_shard(at_limit_shard, default - 4096)
        cases = {f"{args.doc_mb:g} MB document, no limit": (long_shard, 1 << 40),
                 f"{args.doc_mb:g} MB document, default limit ({default >> 20} MiB)": (long_shard, default),
                 "document just under the default limit, read": (at_limit_shard, default)}
        for name, (shard, limit) in cases.items():
            results[name] = run_case(shard, args.tokenizer, limit)
            r = results[name]
            print(f"{name:<48} peak RSS {r['peak_rss_mib']:8.0f} MiB  {r['seconds']:6.1f} s  skipped {r['skipped']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
