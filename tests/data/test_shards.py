"""Reading shards: every bad line and damaged stream is reported with the right kind; good lines all arrive."""
from __future__ import annotations

import base64
import logging
import os
import random
import tracemalloc

import pytest
import zstandard

from hgrn_megatron.corpus.counters import DataCounters
from hgrn_megatron.corpus.records import BadRecord, Document, RecordFormat, RecordParser, SkipWarner, iter_documents
from hgrn_megatron.corpus.shards import DataError, OversizedLine, StreamFault, iter_lines, resolve_shards
from tests.data.data_harness import WORDS, record, write_zst


def test_parser_classifies_every_kind_of_bad_record():
    parse = RecordParser()
    cases = {
        b'{"text": "ok", "meta": {"pile_set_name": "Src"}}': Document("ok", "Src"),
        b'{"text": "no meta"}': Document("no meta", "unknown"),
        b"\xff\xfe not utf-8": "invalid_utf8",
        b'{"text": "lone surrogate \\ud800", "meta": {"pile_set_name": "Src"}}': "invalid_utf8",
        b'{"text": "unterminated': "invalid_json",
        b"": "invalid_json",
        b'["a", "list"]': "invalid_json",
        b'{"meta": {"pile_set_name": "Src"}}': "missing_text",
        b'{"text": "", "meta": {"pile_set_name": "Src"}}': "empty_text",
        b'{"text": 17, "meta": {"pile_set_name": "Src"}}': "non_string_text",
        b'{"text": null}': "missing_text",
        b'{"text": "deep", "meta": ' + b'[' * 100_000 + b']' * 100_000 + b'}': "invalid_json",  # RecursionError
    }
    for line, want in cases.items():
        got = parse(line)
        if isinstance(want, Document):
            assert got == want, line
        else:
            assert isinstance(got, BadRecord) and got.kind == want, (line, got)
    assert parse(b'{"text": "", "meta": {"pile_set_name": "Src"}}').source == "Src"
    nested = RecordParser(RecordFormat(text_field="body.content", source_field="origin"))
    assert nested(b'{"body": {"content": "x"}, "origin": "Wiki"}') == Document("x", "Wiki")


def test_multi_frame_and_plain_shards_yield_every_line(tmp_path):
    lines = [record(f"doc {i}") for i in range(50)]
    zst = write_zst(tmp_path / "a.jsonl.zst", lines, frames=3)
    assert list(iter_lines(zst, chunk_bytes=64)) == lines  # lines span chunk and frame boundaries
    plain = tmp_path / "b.jsonl"
    plain.write_bytes(b"\n".join(lines))  # no newline after the last line
    assert list(iter_lines(plain, chunk_bytes=50)) == lines


def test_truncated_corrupt_and_unreadable_streams_end_with_a_fault(tmp_path):
    rng = random.Random(0)
    # zstd emits output a block (<= 128 KiB) at a time: enough varied text for several blocks.
    lines = [record(f"document {i} " + " ".join(rng.choice(WORDS) for _ in range(60))) for i in range(2000)]
    data = zstandard.ZstdCompressor(level=1).compress(b"".join(l + b"\n" for l in lines))
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(data[: len(data) // 2])
    out = list(iter_lines(cut, chunk_bytes=1024))
    assert isinstance(out[-1], StreamFault) and out[-1].kind == "truncated_stream"
    assert 0 < len(out) - 1 < len(lines) and out[:-1] == lines[: len(out) - 1]  # complete lines only

    garbage = tmp_path / "garbage.jsonl.zst"
    garbage.write_bytes(b"this is not zstd at all" * 100)
    assert [f.kind for f in iter_lines(garbage)] == ["corrupt_stream"]

    tail = tmp_path / "tail.jsonl.zst"  # a good frame, then garbage
    tail.write_bytes(zstandard.ZstdCompressor().compress(b"".join(l + b"\n" for l in lines[:5])) + b"\x00garbage")
    out = list(iter_lines(tail))
    assert out[:5] == lines[:5] and [f.kind for f in out[5:]] == ["corrupt_stream"]

    assert [f.kind for f in iter_lines(tmp_path / "missing.jsonl.zst")] == ["unreadable_shard"]


def test_iter_documents_counts_and_warns_with_shard_and_line(tmp_path, caplog):
    lines = [record("good 0"), b"{bad json", record("good 1"), record(""), b"{bad again", b"{and again"]
    path = write_zst(tmp_path / "mixed.jsonl.zst", lines)
    counters = DataCounters()
    warner = SkipWarner(limit=2)
    with caplog.at_level(logging.WARNING):
        docs = list(iter_documents(path, RecordParser(), shard_name="mixed", counters=counters, warner=warner))
    assert [(line, d.text) for line, d in docs] == [(0, "good 0"), (2, "good 1")]
    summary = counters.summary()
    assert summary["skipped_by_kind"] == {"empty_text": 1, "invalid_json": 3}
    assert summary["skipped_by_shard"] == {"mixed": {"empty_text": 1, "invalid_json": 3}}
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("mixed line 2: skipped (invalid_json)") for m in messages)
    assert any(m.startswith("mixed line 4: skipped (empty_text)") for m in messages)
    # Rate limit: 2 invalid_json lines are named, the third is not (the limit notice is logged instead).
    assert not any("line 6" in m for m in messages)
    assert any("further 'invalid_json' skips" in m for m in messages)


def test_skip_warner_thins_out_to_powers_of_ten():
    logged = []

    class Sink:
        def warning(self, fmt, *args):
            logged.append(fmt % args)

    warner = SkipWarner(limit=3, logger=Sink())
    for line in range(1000):
        warner("s", line, "invalid_json", "x")
    per_line = [m for m in logged if "skipped (invalid_json)" in m]
    summaries = [m for m in logged if "so far" in m]
    assert len(per_line) == 3 and len(summaries) == 3  # 10th, 100th, 1000th
    assert "1000 records skipped" in summaries[-1]


def test_resolve_shards_errors_name_the_field_and_pattern(tmp_path):
    write_zst(tmp_path / "a.jsonl.zst", [record("x")])
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    assert resolve_shards([str(tmp_path / "*.jsonl.zst")], field="f") == [(tmp_path / "a.jsonl.zst").resolve()]
    assert resolve_shards([str(tmp_path)], field="f") == [(tmp_path / "a.jsonl.zst").resolve()]
    with pytest.raises(DataError, match=r"data.train_shards: glob '.*nomatch-\*.jsonl.zst' matches no files"):
        resolve_shards([str(tmp_path / "nomatch-*.jsonl.zst")], field="data.train_shards")
    with pytest.raises(DataError, match=r"data.valid_shards: '.*missing.jsonl.zst' does not exist"):
        resolve_shards([str(tmp_path / "missing.jsonl.zst")], field="data.valid_shards")
    with pytest.raises(DataError, match=r"is not a shard"):
        resolve_shards([str(tmp_path / "notes.txt")], field="f")
    with pytest.raises(DataError, match=r"directory '.*empty' contains no"):
        resolve_shards([str(tmp_path / "empty")], field="f")


def test_links_that_lead_nowhere_are_errors_not_silently_dropped(tmp_path):
    """A dangling link (an unmounted data directory) or a loop among the shards: training on the rest without a
    word would quietly change the data."""
    write_zst(tmp_path / "a.jsonl.zst", [record("x")])
    (tmp_path / "b.jsonl.zst").symlink_to(tmp_path / "gone" / "b.jsonl.zst")
    for pattern in (str(tmp_path / "*.jsonl.zst"), str(tmp_path), str(tmp_path / "b.jsonl.zst")):
        with pytest.raises(DataError, match=r"data.train_shards: .* lists .*b\.jsonl\.zst, which is a dangling "
                                            r"symlink \(-> .*gone/b\.jsonl\.zst"):
            resolve_shards([pattern], field="data.train_shards")
    (tmp_path / "b.jsonl.zst").unlink()
    (tmp_path / "c.jsonl.zst").symlink_to(tmp_path / "d.jsonl.zst")
    (tmp_path / "d.jsonl.zst").symlink_to(tmp_path / "c.jsonl.zst")
    for pattern in (str(tmp_path / "*.jsonl.zst"), str(tmp_path), str(tmp_path / "c.jsonl.zst")):
        with pytest.raises(DataError, match=r"f: .* lists .*[cd]\.jsonl\.zst, which is a symlink loop"):
            resolve_shards([pattern], field="f")
    (tmp_path / "c.jsonl.zst").unlink()
    (tmp_path / "d.jsonl.zst").unlink()
    (tmp_path / "e.jsonl.zst").symlink_to(tmp_path / "a.jsonl.zst")  # a link that works is a shard like any other
    assert resolve_shards([str(tmp_path)], field="f") == [(tmp_path / "a.jsonl.zst").resolve()]


def long_line(size: int) -> bytes:
    """A record of `size` bytes of text that zstd cannot shrink much (so it spans many read chunks)."""
    text = base64.b64encode(os.urandom(size * 3 // 4)).decode()
    return record(text)


@pytest.mark.parametrize("chunk_bytes", [7, 4096, 1 << 20])
def test_an_oversized_line_is_reported_by_size_and_its_neighbours_arrive(tmp_path, chunk_bytes):
    at_limit = record("y" * (1000 - len(record(""))))  # exactly max_line_bytes: kept
    assert len(at_limit) == 1000
    big, small_big = long_line(300_000), long_line(5000)
    lines = [record("before"), big, record("after"), at_limit]
    zst = write_zst(tmp_path / "a.jsonl.zst", lines, frames=2)
    plain = tmp_path / "b.jsonl"
    plain.write_bytes(b"\n".join([*lines, small_big]))  # no newline after the (oversized) last line
    want = [lines[0], OversizedLine(len(big)), lines[2], at_limit]
    assert list(iter_lines(zst, chunk_bytes=chunk_bytes, max_line_bytes=1000)) == want
    assert list(iter_lines(plain, chunk_bytes=chunk_bytes, max_line_bytes=1000)) == [*want, OversizedLine(len(small_big))]
    assert list(iter_lines(zst, chunk_bytes=chunk_bytes)) == lines  # no limit: every line whole

    parser = RecordParser(RecordFormat(max_document_bytes=1000))
    rec = parser(OversizedLine(len(big)))
    assert rec.kind == "oversized_document" and rec.source == "unknown" and "data.max_document_bytes" in rec.detail
    assert parser(small_big).kind == "oversized_document"  # also when handed the bytes themselves
    assert parser(at_limit) == Document("y" * (1000 - len(record(""))), "Synthetic")


def test_an_oversized_line_is_never_held_whole(tmp_path):
    """Reading past a 24 MB record with a 1 MiB limit allocates about a read chunk's worth, not the record."""
    size = 24 << 20
    path = write_zst(tmp_path / "big.jsonl.zst", [record("a"), long_line(size), record("b")])
    tracemalloc.start()
    try:
        out = [x if isinstance(x, OversizedLine) else len(x) for x in iter_lines(path, max_line_bytes=1 << 20)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out == [len(record("a")), OversizedLine(len(long_line(size))), len(record("b"))]
    assert peak < size // 3, f"peak {peak / 2**20:.1f} MiB while reading past a {size >> 20} MiB record"
