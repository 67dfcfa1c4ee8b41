"""The last step of `gpu_suite.sh`: one table of every figure next to its goal, and `suite.json`.

    python benchmarks/gpu_suite_report.py runs/gpu-suite/20261128-150000

Reads `scan.json` (benchmarks/scan_gpu.py) and `train.json` (benchmarks/gpu_train_step.py) from the folder;
either may be missing (a part that failed or timed out), which the table says.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

MFU_GOAL = {"hgrn-1b:hgrn": 0.45}  # for reference MPT-1B trains at 41.8 % MFU on H100 (llm-foundry)
SCAN_SPEEDUP_GOAL, SCAN_COPY_GOAL = 1.3, 0.70  # goals: vs fla chunk_hgrn (fwd+bwd); share of copy bandwidth


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def goal_rows(scan: dict | None, train: dict | None) -> list[tuple[str, str, str, str]]:
    """(figure, value, goal, met) rows."""
    rows = []
    if scan is None:
        rows.append(("scan benchmark", "no scan.json (failed, timed out, or a compile-only smoke run: see scan.log)",
                     "", ""))
    else:
        for name, check in scan.get("correctness", {}).items():
            rows.append((f"scan correctness {name}", f"rel. error {check['max_rel_error']:.1e}", "pass",
                         "yes" if check["pass"] else "NO"))
        for shape in scan.get("shapes", []):
            best = shape.get("ours_best") or {}
            if "fwdbwd_ms" in best:
                share = best["fwdbwd_of_copy"]
                rows.append((f"scan {shape['shape']} fwd+bwd", f"{best['fwdbwd_ms']:.3f} ms, {100 * share:.0f}% of copy",
                             f">= {100 * SCAN_COPY_GOAL:.0f}% of copy", "yes" if share >= SCAN_COPY_GOAL else "no"))
            speedup = shape.get("speedup_vs_fla_chunk_fwdbwd")
            rows.append((f"scan {shape['shape']} vs fla chunk_hgrn",
                         f"{speedup:.2f}x" if speedup else f"n/a ({shape.get('fla', 'fla failed')})"[:60],
                         f">= {SCAN_SPEEDUP_GOAL}x", ("yes" if speedup >= SCAN_SPEEDUP_GOAL else "no") if speedup else ""))
    if train is None:
        rows.append(("training steps", "missing (failed or timed out)", "", ""))
        return rows
    by = {}
    for r in train.get("rows", []):
        if "error" in r:
            rows.append((f"train {r['model']}", r["error"][:70], "", "FAILED"))
            continue
        by[r["model"]] = r
        mfu = r.get("mfu")
        goal = MFU_GOAL.get(r["model"])
        rows.append((f"train {r['model']} (mb {r['micro_batch']} x {r['seq_length']})",
                     f"{r['tokens_per_s']:,.0f} tok/s, {r['step_s']:.3f} s/step, {r['peak_memory_gib']:.1f} GiB, "
                     f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}",
                     f"MFU >= {100 * goal:.0f}%" if goal else "",
                     ("yes" if mfu >= goal else "no") if goal and mfu is not None else ""))
    for preset in sorted({m.split(":")[0] for m in by}):
        h, a = by.get(f"{preset}:hgrn"), by.get(f"{preset}:attention")
        if h and a:
            rows.append((f"{preset}: HGRN / Transformer tokens/s", f"{h['tokens_per_s'] / a['tokens_per_s']:.2f}", "", ""))
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    folder = Path(argv[0])
    scan, train = _load(folder / "scan.json"), _load(folder / "train.json")
    rows = goal_rows(scan, train)
    info = (train or {}).get("info", {}) or {}
    device = info.get("device") or (scan or {}).get("device") or "unknown device"
    print(f"\nGPU suite on {device}{' (CPU SMOKE RUN: figures meaningless)' if info.get('cpu_smoke') else ''}")
    print("| figure | value | goal | met |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    summary = {"device": device, "scan": scan, "train": train,
               "goals": [dict(zip(("figure", "value", "goal", "met"), r)) for r in rows]}
    (folder / "suite.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {folder / 'suite.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
