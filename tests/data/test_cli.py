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
