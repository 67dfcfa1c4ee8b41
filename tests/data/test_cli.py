"""`hgrn-data inspect|verify`: the health check on a shard set."""
from __future__ import annotations

import json

from hgrn_megatron.pretrain.data.__main__ import main
from tests.data.data_harness import ASSETS, record, write_zst


def test_verify_clean_shards_succeeds(capsys):
    assert main(["verify", str(ASSETS / "pile-mini"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "verify: OK: 4 shards, 89 documents, 0 bad records" in err


def test_inspect_and_verify_report_bad_records(tmp_path, capsys):
    write_zst(tmp_path / "a.jsonl.zst", [record("good one", "Src"), b"{oops", record("", "Src"), record("x", "Other")])
    (tmp_path / "b.jsonl.zst").write_bytes(b"not zstd")
    assert main(["inspect", str(tmp_path), "--json", "-", "--quiet", "--tokenizer", str(ASSETS / "tokenizer")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["documents"] == 2
    assert report["skipped_by_kind"] == {"corrupt_stream": 1, "empty_text": 1, "invalid_json": 1}
    assert report["shards"]["a.jsonl.zst"] == {"records": 4, "bytes": report["shards"]["a.jsonl.zst"]["bytes"],
                                                "documents": 2, "invalid_json": 1, "empty_text": 1}
    assert report["sources"]["Src"]["documents"] == 1 and report["sources"]["Src"]["skipped:empty_text"] == 1
    assert report["sources"]["Src"]["tokens"] > 1
    [example] = report["examples"]["invalid_json"]
    assert example.startswith("a.jsonl.zst line 2: invalid JSON: Expecting property name")

    assert main(["verify", str(tmp_path / "*.jsonl.zst"), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "verify: FAILED: 2 shards, 2 documents, 3 bad records" in captured.err
    assert "empty_text: a.jsonl.zst line 3" in captured.out


def test_missing_paths_are_an_error_before_reading(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nothing-*.jsonl.zst")]) == 2
    assert "matches no files" in capsys.readouterr().err


def test_verify_names_shards_that_hold_no_document(tmp_path, capsys):
    """A 0-byte shard (a failed copy) or one of bad records only gives training nothing: not 'OK'."""
    write_zst(tmp_path / "a.jsonl.zst", [record("good one", "Src")])
    (tmp_path / "b.jsonl.zst").write_bytes(b"")
    assert main(["verify", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "hgrn-data: b.jsonl.zst: empty file (0 bytes)" in err
    assert "verify: FAILED: 2 shards, 1 documents, 0 bad records, 1 shards without documents" in err

    (tmp_path / "b.jsonl.zst").unlink()
    write_zst(tmp_path / "c.jsonl.zst", [])  # a valid zstd frame of nothing
    write_zst(tmp_path / "d.jsonl.zst", [b"{bad", record("", "Src")])
    assert main(["verify", str(tmp_path), "--quiet", "--json", str(tmp_path / "report.json")]) == 1
    err = capsys.readouterr().err
    assert "hgrn-data: c.jsonl.zst: no records" in err
    assert "hgrn-data: d.jsonl.zst: no usable document (2 records; skipped {'invalid_json': 1, 'empty_text': 1})" in err
    assert set(json.loads((tmp_path / "report.json").read_text())["problems"]) == {"c.jsonl.zst", "d.jsonl.zst"}


def test_verify_counts_oversized_records(tmp_path, capsys):
    lines = [record("good one", "Src"), record("x" * 5000, "Src"), record("more", "Src")]
    write_zst(tmp_path / "a.jsonl.zst", lines)
    assert main(["verify", str(tmp_path), "--quiet"]) == 0  # under the default limit
    capsys.readouterr()
    assert main(["inspect", str(tmp_path), "--quiet", "--json", "-", "--max-document-bytes", "4096"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["skipped_by_kind"] == {"oversized_document": 1} and report["documents"] == 2
    assert report["shards"]["a.jsonl.zst"]["records"] == 3
    assert report["shards"]["a.jsonl.zst"]["bytes"] == sum(len(line) + 1 for line in lines)
    assert main(["verify", str(tmp_path), "--quiet", "--max-document-bytes", "4096"]) == 1
    assert main(["verify", str(tmp_path), "--quiet", "--max-document-bytes", "0"]) == 2
