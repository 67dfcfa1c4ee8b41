"""benchmarks/scan_cpu.py runs at a toy size, in both of its modes, and writes its table and JSON: its code
cannot rot between the runs that produce the published figures. No timing is asserted."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOY = ["--batch", "2", "--seq", "16", "--dim", "64", "--repeats", "1"]


def _run(args: list[str]) -> str:
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scan_cpu.py"), *TOY, *args], cwd=REPO,
                            check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_scan_cpu_benchmark_against_the_reference(tmp_path):
    out = tmp_path / "scan.json"
    stdout = _run(["--json", str(out)])
    results = json.loads(out.read_text())["results"]
    expected = {"reference", "cpu (fused)", "cpu (fused), outputs in 4 KiB pages", "cpu kernel alone, outputs reused"}
    for variant in ("real", "complex"):
        torch_rows = [name for name in results[variant] if name.startswith("torch L=")]
        assert len(torch_rows) == 1 and set(results[variant]) - set(torch_rows) == expected
        assert results[variant]["reference"]["speedup_fwd_bwd"] == 1.0
        assert all(r["fwd_bwd_ms"] > 0 for r in results[variant].values())
        assert f"| {variant} | cpu (fused) |" in stdout


def test_scan_cpu_benchmark_pages_only(tmp_path):
    out = tmp_path / "pages.json"
    _run(["--pages-only", "--variants", "complex", "--json", str(out)])
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["complex"]
    baseline, advised = results["complex"].values()
    assert list(results["complex"]) == ["cpu (fused), outputs in 4 KiB pages", "cpu (fused)"]
    assert baseline["speedup_fwd_bwd"] == 1.0 and advised["fwd_bwd_ms"] > 0
