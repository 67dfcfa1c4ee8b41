"""The end-to-end training benchmarks run, at toy sizes, through the real engine: their code cannot rot
unnoticed between the (slow, or GPU-only) runs that produce the published figures. No timing is asserted."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
TOY_MODEL = ["--hidden", "64", "--layers", "2", "--ffn", "128", "--heads", "4", "--vocab", "256"]


def _run(args: list[str], timeout: float = 600) -> str:
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


@pytest.mark.slow
def test_train_throughput_sweep_writes_table_json_and_plot(tmp_path):
    out, png = tmp_path / "throughput.json", tmp_path / "throughput.png"
    stdout = _run([str(BENCH / "train_throughput.py"), *TOY_MODEL, "--seq-lengths", "32", "128",
                   "--tokens-per-step", "256", "--rounds", "2", "--threads", "1", "--json", str(out), "--png", str(png)])
    assert "| HGRN | 128 | 2 |" in stdout and "| Transformer | 32 | 8 |" in stdout
    result = json.loads(out.read_text())
    rows = {(r["mixer"], r["seq_length"]): r for r in result["rows"]}
    assert set(rows) == {(m, s) for m in ("hgrn", "attention") for s in (32, 128)}
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["tokens_per_cpu_s"] > 0
        assert 0 < row["peak_rss_growth_per_token"] and row["activation_bytes_per_token"] > 1024
    # Same tokens per step at every T: the HGRN's saved activations per token do not depend on T (only the
    # scan's per-chunk summaries do, a fraction of a percent).
    short, long = rows[("hgrn", 32)], rows[("hgrn", 128)]
    assert long["activation_bytes_per_token"] == pytest.approx(short["activation_bytes_per_token"], rel=0.02)
    assert any("goal >= 2" in name for name in result["goals"])
    assert png.stat().st_size > 10_000


def test_profile_splits_one_step_by_component(tmp_path):
    out = tmp_path / "profile.json"
    stdout = _run([str(BENCH / "train_throughput.py"), *TOY_MODEL, "--tokens-per-step", "128", "--threads", "1",
                   "--profile", "hgrn:64", "--json", str(out)])
    profile = json.loads(out.read_text())["profile"]
    components = profile["components_ms"]
    assert sum(components.values()) == pytest.approx(profile["aten_self_ms"], rel=1e-6)
    assert "matmuls and attention kernels (model arithmetic)" in components
    assert "HGRN scan (kernels/)" in components  # the scan's backward is recognised by its autograd node
    assert set(profile["phases"]) == {"forward_s", "backward_s", "step_s", "total_s"}
    assert "| component | ms | share |" in stdout


def test_gpu_train_step_cpu_smoke_takes_the_search_retry_and_mfu_paths(tmp_path):
    out = tmp_path / "train.json"
    stdout = _run([str(BENCH / "gpu_train_step.py"), "--cpu-smoke", "--models", "tiny:hgrn", "--steps", "1",
                   "--warmup", "1", "--max-micro-batch", "6", "--simulate-oom-above", "3", "--peak-tflops", "1",
                   "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert "error" not in row, row
    # 6 is tried first (the extrapolation is capped there), then 5 and 4 fail on fresh engines, 3 runs.
    assert [p["micro_batch"] for p in row["search"]["probes"]] == [1, 1, 2, 6, 5, 4, 3]
    assert row["micro_batch"] == 3 and row["mfu"] == pytest.approx(row["achieved_tflops"], rel=1e-9)
    assert "| tiny:hgrn |" in stdout
    report = _run([str(BENCH / "gpu_suite_report.py"), str(tmp_path)])
    assert "CPU SMOKE RUN" in report and "train tiny:hgrn (mb 3 x 128)" in report
    assert json.loads((tmp_path / "suite.json").read_text())["goals"]
