"""Rebuild tests/assets/pile-mini from a larger Pile-format sample (see pile-mini/README.md).

    python tests/assets/make_pile_mini.py --source PILE_SAMPLE_DIR --out tests/assets/pile-mini

Keeps only public-domain sources. Train shard i takes documents from the source's training shard i, one source
at a time in turn (so small sources are represented) until a character budget, in the source's order.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import zstandard

PUBLIC_DOMAIN = (
    "Books-Austen",
    "Books-Bible",
    "Books-Commentary",
    "Books-ShakespeareMilton",
    "DevilsDictionary",
    "JargonFile",
)


def read(path: Path) -> list[dict]:
    with open(path, "rb") as fh:
        text = zstandard.ZstdDecompressor().stream_reader(fh).read().decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line]


def pick(records: list[dict], budget_chars: int) -> list[dict]:
    by_source: dict[str, list[int]] = {s: [] for s in PUBLIC_DOMAIN}
    for i, rec in enumerate(records):
        if rec["meta"]["pile_set_name"] in by_source:
            by_source[rec["meta"]["pile_set_name"]].append(i)
    chosen, chars = set(), 0
    while chars < budget_chars and any(by_source.values()):
        for indices in by_source.values():
            if indices and chars < budget_chars:
                i = indices.pop(0)
                chosen.add(i)
                chars += len(records[i]["text"])
    return [records[i] for i in sorted(chosen)]


def write(path: Path, records: list[dict]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    path.write_bytes(zstandard.ZstdCompressor(level=19).compress(data))
    print(f"{path.name}: {len(records)} documents, {len(data)} bytes of JSON, {path.stat().st_size} compressed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", required=True, type=Path, help="directory with 00..03.jsonl.zst and val.jsonl.zst")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--train-shards", type=int, default=3)
    ap.add_argument("--train-chars", type=int, default=800_000, help="characters per training shard")
    ap.add_argument("--val-chars", type=int, default=150_000)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for i in range(args.train_shards):
        write(args.out / f"train-{i:02d}.jsonl.zst", pick(read(args.source / f"{i:02d}.jsonl.zst"), args.train_chars))
    write(args.out / "val.jsonl.zst", pick(read(args.source / "val.jsonl.zst"), args.val_chars))


if __name__ == "__main__":
    main()
