"""benchmarks/data_pipeline.py runs at a toy size with 0 and 1 workers and writes its JSON: its code cannot rot
between the runs that produce the published figures. No timing is asserted."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_data_pipeline_benchmark_runs_at_a_toy_size(tmp_path):
    out = tmp_path / "pipeline.json"
    args = ["--seq-length", "256", "--micro-batch", "2", "--lanes", "4", "--rounds", "1", "--slices", "2",
            "--window-passes", "0.3", "--workers", "0", "1", "--json", str(out)]
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "data_pipeline.py"), *args], cwd=REPO,
                            check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    summary = json.loads(out.read_text())
    for workers in (0, 1):
        assert len(summary[f"ratio_{workers}w_cpu_rounds"]) == 1
        assert summary[f"ratio_{workers}w_cpu"] > 0 and summary[f"pipeline_{workers}w_tokens_per_cpu_s"] > 0
    assert summary["raw_list_form_rate_over_array_form"] > 0
