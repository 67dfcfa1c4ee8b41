"""The context- and sequence-parallel benchmarks run at toy sizes on real gloo ranks: their code cannot rot between
the runs that produce the published figures, and what they report is checked (equal losses, the memory split).
No timing is asserted."""
from __future__ import annotations

import json

import pytest

from tests.benchmarks.test_training_benchmarks import BENCH, _run

pytestmark = [pytest.mark.distributed]


@pytest.mark.slow
def test_train_throughput_context_parallel_rows(tmp_path):
    out = tmp_path / "cp.json"
    stdout = _run([str(BENCH / "train_throughput.py"), "--context-parallel", "512", "--rounds", "2",
                   "--json", str(out)])
    assert "tokens/s at CP 2 / CP 1" in stdout
    result = json.loads(out.read_text())
    assert [(r["cp"], r["threads_per_rank"]) for r in result["rows"]] == [(1, 1), (1, 2), (2, 1)]
    one, _, two = result["rows"]
    assert two["saved_bytes_per_rank"] == pytest.approx(one["saved_bytes_per_rank"] / 2, rel=0.02)
    assert result["goals"]["largest loss difference CP 2 - CP 1"] < 1e-5
    assert all(r["tokens_per_s"] > 0 and r["tokens_per_cpu_s"] > 0 for r in result["rows"])


def test_sequence_parallel_benchmark_halves_the_saved_bytes(tmp_path):
    out = tmp_path / "sp.json"
    _run([str(BENCH / "sequence_parallel.py"), "--seq", "256", "--json", str(out)])
    tp1, tp2, sp2 = json.loads(out.read_text())["rows"]
    assert (tp2["tp"], sp2["tp"], sp2["sequence_parallel"]) == (2, 2, True)
    assert sp2["saved_bytes"] == pytest.approx(tp1["saved_bytes"] / 2, rel=0.01)
    assert sp2["saved_bytes"] < tp2["saved_bytes"]
    for row in (tp2, sp2):
        assert row["loss"] == pytest.approx(tp1["loss"], rel=1e-6)
        assert row["grad_norm"] == pytest.approx(tp1["grad_norm"], rel=1e-5)
