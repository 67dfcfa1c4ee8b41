"""benchmarks/ablations.py end to end at a toy size: real training runs through the framework's CLI, the
table, the curves and the gate probe; a second invocation reuses the finished runs. No quality is asserted
(a few hundred tokens teach nothing), only that every number is computed from the runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "tests" / "assets"


def _run(out: Path) -> str:
    cmd = [sys.executable, str(REPO / "benchmarks" / "ablations.py"),
           "--train-shards", str(ASSETS / "pile-mini" / "train-*.jsonl.zst"),
           "--valid-shards", str(ASSETS / "pile-mini" / "val.jsonl.zst"),
           "--tokenizer", str(ASSETS / "tokenizer" / "tokenizer.model"), "--out", str(out),
           "--tokens", "256", "--seeds", "1", "--seeds-per", "full=2",
           "--variants", "full", "no_lower_bound", "transformer",
           "--hidden", "32", "--layers", "3", "--ffn", "64", "--heads", "2", "--seq", "32", "--batch", "4",
           "--curve-points", "2", "--valid-samples", "4", "--probe-samples", "2"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_ablation_study_end_to_end(tmp_path):
    out = tmp_path / "study"
    _run(out)
    results = json.loads((out / "results.json").read_text())
    variants = results["variants"]
    assert list(variants) == ["full", "no_lower_bound", "transformer"]
    assert [len(v["runs"]) for v in variants.values()] == [2, 1, 1]
    full = variants["full"]
    losses = [r["final"]["val_loss"] for r in full["runs"]]
    assert losses[0] != losses[1] and full["val_loss"][1] > 0  # two seeds, two models, a spread
    assert all(r["final"]["step"] == 2 for v in variants.values() for r in v["runs"])  # 256 tokens / (4 x 32)
    assert full["per_source"] and all(len(r["val_curve"]) == 2 for r in full["runs"])
    matched = results["matched_parameters"]
    assert abs(matched["transformer"] - matched["hgrn"]) <= 0.01 * matched["hgrn"]
    assert variants["transformer"]["parameters"] == matched["transformer"]
    # γ_0 = 0 and γ rises with depth (from the learned table); no table: γ = 0 everywhere.
    assert full["lower_bound"][0] == 0 and full["lower_bound"][1] < full["lower_bound"][2] < 1
    assert variants["no_lower_bound"]["lower_bound"] == [0.0, 0.0, 0.0]
    assert all(0 < f < 1 for f in full["forget_gate"]) and "lower_bound" not in variants["transformer"]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "full" in (out / "results.md").read_text()
    # A second invocation trains nothing again and reports the same numbers.
    stdout = _run(out)
    assert stdout.count("already trained") == 4
    assert json.loads((out / "results.json").read_text())["variants"]["full"]["val_loss"] == full["val_loss"]
