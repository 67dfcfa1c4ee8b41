"""`hgrn-data`: the health check to run on a shard set before a long job.

    hgrn-data inspect 'data/train/*.jsonl.zst' [--tokenizer tokenizers/pile-32k] [--json report.json]
    hgrn-data verify  'data/train/*.jsonl.zst'
    hgrn-data reshard 'data/train/*.jsonl.zst' --out data/train-framed [--frame-mib 4] [--workers N]

Both read every record of every shard (with a progress bar over the compressed bytes) and report documents,
bytes (and tokens, given a tokenizer) per source, and bad records by kind, per shard and per source, naming the
first few bad lines, and every shard that holds no usable document (an empty file included). `verify` exits with
status 1 if anything was skipped or a shard holds no document, 0 if the shards are clean. `reshard` rewrites
shards as independent zstd frames with a frame index beside each (see `reshard_cli.py`).
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

from hgrn_megatron.corpus.records import DEFAULT_FORMAT, BadRecord, RecordFormat, RecordParser, as_record
from hgrn_megatron.corpus.shards import (
    DataError,
    OversizedLine,
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
        for ids, source in zip(tokenizer.encode_documents([d.text for d in pending]), (d.source for d in pending)):
            sources[source]["tokens"] += len(ids)  # EOS included, as packed for training
        pending.clear()

    total = sum(os.path.getsize(p) for p in paths if os.path.exists(p))
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading shards", disable=not progress) as bar:
        for path, name in zip(paths, names):
            counts = shards[name] = Counter()
            lines = iter_lines(path, on_read=bar.update, max_line_bytes=parser.format.max_document_bytes)
            for line, raw in enumerate(lines):
                if not isinstance(raw, StreamFault):
                    counts["records"] += 1
                    counts["bytes"] += (raw.size if isinstance(raw, OversizedLine) else len(raw)) + 1
                rec = as_record(raw, parser)
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
        "problems": shard_problems(paths, names, shards),
        "sources": {s: dict(c) for s, c in sorted(sources.items())},
        "skipped_by_kind": dict(sorted(kinds.items())),
        "skipped_total": sum(kinds.values()),
        "documents": sum(c["documents"] for c in shards.values()),
        "examples": dict(examples),
    }


def shard_problems(paths: list[Path], names: list[str], shards: dict[str, Counter]) -> dict[str, str]:
    """{shard: what is wrong} for each shard that gives training nothing: a 0-byte file is as likely a failed
    copy as a deliberate one, and a shard of bad records only is worth a look even though each is counted."""
    problems = {}
    for path, name in zip(paths, names):
        c = shards[name]
        if c["documents"]:
            continue
        skipped = {k: v for k, v in c.items() if k not in ("records", "documents", "bytes")}
        if _size(path) == 0:
            problems[name] = "empty file (0 bytes)"
        elif not c["records"] and not skipped:
            problems[name] = "no records"
        else:
            problems[name] = f"no usable document ({c['records']} records; skipped {skipped})"
    return problems


def _size(path: Path) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


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
    for name, problem in report["problems"].items():
        print(f"  no documents: {name}: {problem}")


@exit_quietly_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["reshard"]:
        from .reshard_cli import main as reshard_main

        return reshard_main(argv[1:])
    ap = argparse.ArgumentParser(prog="hgrn-data", description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["inspect", "verify", "reshard"])
    ap.add_argument("shards", nargs="+", help="globs, directories or files of *.jsonl[.zst]")
    ap.add_argument("--tokenizer", help="tokenizer (.model or directory) to count tokens per source")
    ap.add_argument("--text-field", default=DEFAULT_FORMAT.text_field)
    ap.add_argument("--source-field", default=DEFAULT_FORMAT.source_field)
    ap.add_argument("--max-document-bytes", type=int, default=DEFAULT_FORMAT.max_document_bytes,
                    help="longer records count as 'oversized_document' (as data.max_document_bytes in training)")
    ap.add_argument("--json", help="also write the report as JSON to this file ('-' = stdout only JSON)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        record_format = RecordFormat(args.text_field, args.source_field, args.max_document_bytes)
        paths = resolve_shards(args.shards, field="shards")
        tokenizer = None
        if args.tokenizer:
            from hgrn_megatron.tokenizer import Tokenizer

            tokenizer = Tokenizer.load(args.tokenizer)
    except (DataError, ValueError) as err:
        print(f"hgrn-data: error: {err}", file=sys.stderr)
        return 2
    report = scan_shards(paths, shard_display_names(paths), RecordParser(record_format), tokenizer,
                         progress=not args.quiet)
    if args.json == "-":
        print(json.dumps(report, indent=1))
    else:
        print_report(report, tokenizer is not None)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
    if args.command == "verify":
        problems = report["problems"]
        for name, problem in problems.items():
            print(f"hgrn-data: {name}: {problem}", file=sys.stderr)
        ok = report["skipped_total"] == 0 and not problems
        print(f"verify: {'OK' if ok else 'FAILED'}: {len(paths)} shards, {report['documents']:,} documents, "
              f"{report['skipped_total']:,} bad records" + (f", {len(problems)} shards without documents"
                                                           if problems else ""), file=sys.stderr)
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
