"""`hgrn-data reshard`: shards rewritten as independent zstd frames with an index, every line arriving in order."""
from __future__ import annotations

import json
import os

import pytest
import zstandard

from hgrn_megatron.corpus.frames import index_path, load_index
from hgrn_megatron.corpus.reshard import reshard_one
from hgrn_megatron.corpus.shards import DataError, StreamFault, iter_decompressed, iter_lines
from hgrn_megatron.pretrain.data.__main__ import main
from tests.data.data_harness import ASSETS, SHARED_PILE, record, write_zst


def raw_lines(path) -> list[bytes]:
    return [x for x in iter_lines(path) if not isinstance(x, StreamFault)]


def frame_lines(path) -> list[bytes]:
    """Every line, read frame by frame alone through the index (seeking, never from byte 0)."""
    index = load_index(path)
    out = []
    for frame in index.frames:
        lines = [x for x in iter_lines(path, start=frame.offset, length=frame.length)]
        assert len(lines) == frame.lines and not any(isinstance(x, StreamFault) for x in lines)
        out.extend(lines)
    return out


def check_round_trip(src_dir, out_dir, names):
    for name in names:
        src, out = src_dir / name, out_dir / name
        want = raw_lines(src)
        assert raw_lines(out) == want, name  # a plain zstd reader sees the same lines
        assert frame_lines(out) == want, name
        assert load_index(out).lines == len(want)


def test_pile_mini_round_trips_frame_by_frame(tmp_path, capsys):
    src = ASSETS / "pile-mini"
    assert main(["reshard", str(src), "--out", str(tmp_path), "--frame-mib", "0.05", "--quiet"]) == 0
    names = sorted(p.name for p in src.glob("*.jsonl.zst"))
    check_round_trip(src, tmp_path, names)
    index = load_index(tmp_path / "train-00.jsonl.zst")
    assert len(index.frames) > 5  # 0.05 MiB frames: many per shard
    assert "4 shards (0 already done), 89 lines" in capsys.readouterr().err


@pytest.mark.skipif(not SHARED_PILE.is_dir(), reason="the Pile-format sample is not next to the repository")
def test_pile_sample_round_trips_with_two_workers(tmp_path):
    assert main(["reshard", str(SHARED_PILE), "--out", str(tmp_path), "--frame-mib", "1", "--workers", "2",
                 "--quiet"]) == 0
    names = sorted(p.name for p in SHARED_PILE.glob("*.jsonl.zst"))
    check_round_trip(SHARED_PILE, tmp_path, names)
    assert all(len(load_index(tmp_path / n).frames) > 1 for n in names if not n.startswith("val"))


def test_bad_records_pass_through_byte_for_byte(tmp_path):
    lines = [record("good one", "Src"), b"{oops", b"\xff\xfe not utf-8", record("", "Src"), b"",
             record("x" * 5000, "Big"), b"[1, 2]", record("last", "Src")]
    (tmp_path / "in").mkdir()
    src = write_zst(tmp_path / "in" / "a.jsonl.zst", lines)
    reshard_one(src, tmp_path / "out" / "a.jsonl.zst", frame_bytes=64)
    out = tmp_path / "out" / "a.jsonl.zst"
    assert raw_lines(out) == lines and frame_lines(out) == lines
    # A record longer than a frame stretches its frame: frames still end at line ends.
    assert len(load_index(out).frames) >= 3


def test_plain_jsonl_without_final_newline(tmp_path):
    (tmp_path / "p.jsonl").write_bytes(b'{"text": "a"}\n{"text": "b"}\n{"text": "c"}')
    result = reshard_one(tmp_path / "p.jsonl", tmp_path / "o" / "p.jsonl.zst", frame_bytes=10)
    assert result.lines == 3 and raw_lines(tmp_path / "o" / "p.jsonl.zst") == [b'{"text": "a"}', b'{"text": "b"}',
                                                                               b'{"text": "c"}']
    assert frame_lines(tmp_path / "o" / "p.jsonl.zst")[-1] == b'{"text": "c"}'


def test_truncated_input_keeps_what_was_readable_and_reports_it(tmp_path, capsys):
    lines = [record(f"doc {i} " + "word " * 200, "Src") for i in range(40)]
    (tmp_path / "in").mkdir()
    src = write_zst(tmp_path / "in" / "t.jsonl.zst", lines, frames=8)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) * 3 // 5])
    readable = raw_lines(src)
    assert 0 < len(readable) < len(lines)
    assert main(["reshard", str(src), "--out", str(tmp_path / "out"), "--frame-mib", "0.01", "--quiet"]) == 1
    assert "truncated_stream" in capsys.readouterr().err
    out = tmp_path / "out" / "t.jsonl.zst"
    got = raw_lines(out)
    assert got[: len(readable)] == readable  # plus, at most, the line the cut went through (a bad record now)
    assert len(got) - len(readable) <= 1
    assert json.loads(index_path(out).read_text())["fault"]["kind"] == "truncated_stream"


def test_rerun_skips_finished_shards_and_redoes_interrupted_ones(tmp_path):
    src = ASSETS / "pile-mini"
    out = tmp_path / "out"
    assert main(["reshard", str(src), "--out", str(out), "--frame-mib", "0.1", "--quiet"]) == 0
    done = out / "train-00.jsonl.zst"
    stamp = os.stat(done).st_mtime_ns
    # An interruption: one shard written but not indexed, another with only its temporary file.
    index_path(out / "train-01.jsonl.zst").unlink()
    (out / "train-02.jsonl.zst").unlink()
    index_path(out / "train-02.jsonl.zst").unlink()
    (out / "train-02.jsonl.zst.tmp").write_bytes(b"half")
    assert main(["reshard", str(src), "--out", str(out), "--frame-mib", "0.1", "--quiet"]) == 0
    assert os.stat(done).st_mtime_ns == stamp
    check_round_trip(src, out, ["train-00.jsonl.zst", "train-01.jsonl.zst", "train-02.jsonl.zst"])


def test_an_index_that_does_not_fit_its_shard_is_refused(tmp_path):
    out = tmp_path / "a.jsonl.zst"
    reshard_one(ASSETS / "pile-mini" / "val.jsonl.zst", out, frame_bytes=20000)
    out.write_bytes(out.read_bytes() + zstandard.ZstdCompressor().compress(b'{"text": "more"}\n'))
    with pytest.raises(DataError, match="changed since it was indexed"):
        load_index(out)


def test_frames_are_standalone_zstd_frames(tmp_path):
    out = tmp_path / "a.jsonl.zst"
    reshard_one(ASSETS / "pile-mini" / "train-01.jsonl.zst", out, frame_bytes=30000)
    blob = out.read_bytes()
    for frame in load_index(out).frames:
        piece = blob[frame.offset : frame.offset + frame.length]
        text = zstandard.ZstdDecompressor().decompressobj().decompress(piece)
        assert text.count(b"\n") == frame.lines
    assert b"".join(x for x in iter_decompressed(out)) == b"".join(
        x for x in iter_decompressed(ASSETS / "pile-mini" / "train-01.jsonl.zst"))


def test_bad_options_exit_2(tmp_path, capsys):
    assert main(["reshard", str(ASSETS / "pile-mini"), "--out", str(tmp_path), "--frame-mib", "0"]) == 2
    assert "--frame-mib must be > 0" in capsys.readouterr().err
    assert main(["reshard", str(tmp_path / "none-*.jsonl.zst"), "--out", str(tmp_path)]) == 2
