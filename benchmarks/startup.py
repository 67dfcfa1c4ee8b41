"""Model build at start-up: megatron's random initialisation (a fresh run) against none (a resume, whose
checkpoint overwrites every weight). Time and peak RSS of building one rank's model, each in a fresh process.

    python benchmarks/startup.py [--preset hgrn-1b] [--tp 1]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def build(preset: str, initialize: bool) -> dict:
    from hgrn_megatron.config import ModelConfig
    from hgrn_megatron.model import build_model, single_process_model_parallel
    from hgrn_megatron.runtime_env import configure_environment, patch_for_cpu

    configure_environment()
    patch_for_cpu()
    with single_process_model_parallel():
        t0 = time.perf_counter()
        model = build_model(ModelConfig.build({"preset": preset}), 32768, initialize=initialize)
        seconds = time.perf_counter() - t0
        params = sum(p.numel() for p in model.parameters())
    return {"initialize": initialize, "build_s": seconds, "parameters": params,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="hgrn-1b")
    parser.add_argument("--child", choices=["init", "noinit"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(build(args.preset, args.child == "init")))
        return 0
    rows = []
    for mode in ("init", "noinit"):
        out = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--child", mode],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    print(f"| {args.preset} ({rows[0]['parameters'] / 1e9:.3f} B parameters, TP 1) | build s | peak RSS GiB |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {'random initialisation (fresh run)' if r['initialize'] else 'no initialisation (resume)'} "
              f"| {r['build_s']:.1f} | {r['peak_rss_gib']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
