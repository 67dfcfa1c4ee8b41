"""`hgrn-data`: the health check to run on a shard set before a long job.

    hgrn-data inspect 'data/train/*.jsonl.zst' [--tokenizer tokenizers/pile-32k] [--json report.json]
    hgrn-data verify  'data/train/*.jsonl.zst'

Both read every record of every shard (with a progress bar over the compressed bytes) and report documents,
bytes (and tokens, given a tokenizer) per source, and bad records by kind, per shard and per source, naming the
first few bad lines. `verify` exits with status 1 if anything was skipped, 0 if the shards are clean.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

from tqdm import tqdm

from hgrn_megatron.corpus.shards import (
    UNKNOWN_SOURCE,
    BadRecord,
    DataError,
    RecordParser,
    StreamFault,
    iter_lines,
    resolve_shards,
    shard_display_names,
)
from hgrn_megatron.runtime_env import exit_quietly_on_broken_pipe

ENCODE_BATCH_DOCS = 64
EXAMPLES_PER_KIND = 3


def scan_shards(
    paths: list[Path], names: list[str], parser: RecordParser, tokenizer=None, progress: bool = True
) -> dict:
    """Read every record; return per-source, per-shard and per-kind counts plus example bad lines."""
    sources: dict[str, Counter] = defaultdict(Counter)
    shards: dict[str, Counter] = {}
    kinds: Counter = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    pending: list = []

    def flush():
        for ids, source in zip(tokenizer.encode_batch([d.text for d in pending]), (d.source for d in pending)):
            sources[source]["tokens"] += len(ids) + 1  # + EOS, as packed for training
        pending.clear()

    total = sum(os.path.getsize(p) for p in paths if os.path.exists(p))
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading shards", disable=not progress) as bar:
        for path, name in zip(paths, names):
            counts = shards[name] = Counter()
            for line, raw in enumerate(iter_lines(path, on_read=bar.update)):
                if isinstance(raw, StreamFault):
                    rec = BadRecord(raw.kind, UNKNOWN_SOURCE, raw.detail)
                else:
                    counts["records"] += 1
                    counts["bytes"] += len(raw) + 1
                    rec = parser(raw)
                if isinstance(rec, BadRecord):
                    counts[rec.kind] += 1
                    kinds[rec.kind] += 1
                    sources[rec.source][f"skipped:{rec.kind}"] += 1
                    if len(examples[rec.kind]) < EXAMPLES_PER_KIND:
                        examples[rec.kind].append(f"{name} line {line + 1}: {rec.detail}")
                    continue
                counts["documents"] += 1
                src = sources[rec.source]
                src["documents"] += 1
                src["text_bytes"] += len(rec.text.encode("utf-8"))
                if tokenizer is not None:
                    pending.append(rec)
                    if len(pending) >= ENCODE_BATCH_DOCS:
                        flush()
    if tokenizer is not None and pending:
        flush()
    return {
        "shards": {n: dict(c) for n, c in shards.items()},
        "sources": {s: dict(c) for s, c in sorted(sources.items())},
        "skipped_by_kind": dict(sorted(kinds.items())),
        "skipped_total": sum(kinds.values()),
        "documents": sum(c["documents"] for c in shards.values()),
        "examples": dict(examples),
    }


def print_report(report: dict, with_tokens: bool) -> None:
    head = f"{'source':<28}{'documents':>12}{'MB':>10}" + (f"{'tokens':>14}{'bytes/tok':>10}" if with_tokens else "")
    print(head + f"{'skipped':>9}")
    for name, c in report["sources"].items():
        skipped = sum(v for k, v in c.items() if k.startswith("skipped:"))
        row = f"{name[:27]:<28}{c.get('documents', 0):>12,}{c.get('text_bytes', 0) / 1e6:>10.2f}"
        if with_tokens:
            tokens = c.get("tokens", 0)
            row += f"{tokens:>14,}{(c.get('text_bytes', 0) / tokens if tokens else 0):>10.2f}"
        print(row + f"{skipped:>9,}")
    print(f"\n{'shard':<40}{'records':>10}{'documents':>11}  skipped")
    for name, c in report["shards"].items():
        bad = {k: v for k, v in c.items() if k not in ("records", "documents", "bytes")}
        print(f"{name[-39:]:<40}{c.get('records', 0):>10,}{c.get('documents', 0):>11,}  {bad or '-'}")
    print(f"\n{report['documents']:,} documents; {report['skipped_total']:,} skipped {report['skipped_by_kind'] or ''}")
    for kind, lines in report["examples"].items():
        for text in lines:
            print(f"  {kind}: {text}")


@exit_quietly_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="hgrn-data", description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["inspect", "verify"])
    ap.add_argument("shards", nargs="+", help="globs, directories or files of *.jsonl[.zst]")
    ap.add_argument("--tokenizer", help="tokenizer (.model or directory) to count tokens per source")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--source-field", default="meta.pile_set_name")
    ap.add_argument("--json", help="also write the report as JSON to this file ('-' = stdout only JSON)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        paths = resolve_shards(args.shards, field="shards")
        tokenizer = None
        if args.tokenizer:
            from hgrn_megatron.tokenizer import Tokenizer

            tokenizer = Tokenizer.load(args.tokenizer)
    except (DataError, ValueError) as err:
        print(f"hgrn-data: error: {err}", file=sys.stderr)
        return 2
    report = scan_shards(paths, shard_display_names(paths), RecordParser(args.text_field, args.source_field),
                         tokenizer, progress=not args.quiet)
    if args.json == "-":
        print(json.dumps(report, indent=1))
    else:
        print_report(report, tokenizer is not None)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
    if args.command == "verify":
        ok = report["skipped_total"] == 0
        print(f"verify: {'OK' if ok else 'FAILED'}: {len(paths)} shards, {report['documents']:,} documents, "
              f"{report['skipped_total']:,} bad records", file=sys.stderr)
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
