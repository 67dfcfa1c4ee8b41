"""Training steps on one GPU: HGRN presets and their same-size Transformer baselines, bf16, ZeRO-1.

    python benchmarks/gpu_train_step.py --out runs/gpu-suite/train.json        # on one GPU (part of gpu_suite.sh)
    python benchmarks/gpu_train_step.py --cpu-smoke --out /tmp/smoke.json     # the same code paths on CPU, tiny

For each model (default: hgrn-1b, its Transformer baseline, hgrn-125m, its baseline; sequence 2048, the
presets' 50,304-token vocabulary) it builds the trainer's engine (`pretrain.engine.build_engine`: megatron-core,
torch's fused AdamW, DeepSpeed ZeRO-1, bf16), finds the largest micro-batch that fits, then times steps:
- micro-batch search: the step's peak memory at micro-batches 1 and 2 gives the cost of one more sample; the
  largest micro-batch whose extrapolated peak stays under `--memory-fraction` of the device is tried, and cut
  by 15 % (with a fresh engine) until it runs. A few steps instead of a bisection of OOMs;
- timing: `--warmup` steps, then the median of `--steps` steps (wall clock; each step ends with a loss read
  that waits for the device); tokens/s = micro-batch x sequence / step time;
- memory: the CUDA allocator's peak during the timed steps (and what it had reserved);
- MFU: `hgrn_megatron.flops.flops_per_token` (forward + backward, every matmul, the scan and gates) x tokens/s
  over the device's dense bf16 peak from `pretrain.metrics.PEAK_FLOPS`.
Goal: hgrn-1b >= 45 % MFU on one H200 (OLMo-core and MPT-1B class efficiency for a 1B model).

`--cpu-smoke` runs every step of that on the CPU at the `tiny` preset's size (bf16, ZeRO-1, synthetic tokens),
with peak RSS standing in for device memory and a small memory budget, so the search, timing, MFU and report
code are exercised on a machine without a GPU (its figures mean nothing).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

from common import build_engine, init_single_rank, machine_info, run_config, spread, synthetic_tokens, timed_step

DEFAULT_MODELS = ["hgrn-1b:hgrn", "hgrn-1b:attention", "hgrn-125m:hgrn", "hgrn-125m:attention"]
GIB = 2**30


class Memory:
    """Peak-memory probe: the CUDA allocator on GPU; resident set size (VmHWM) on CPU (smoke runs only)."""

    def __init__(self, cuda: bool, cpu_budget_gib: float):
        self.cuda = cuda
        import torch

        self.torch = torch
        self.capacity = torch.cuda.get_device_properties(0).total_memory if cuda else cpu_budget_gib * GIB

    @staticmethod
    def is_oom(err: BaseException) -> bool:
        """An allocation failure, however the layers above the allocator re-raised it."""
        return isinstance(err, MemoryError) or "out of memory" in str(err).lower()

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated()
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("/proc/self/status has no VmHWM")

    def reserved(self) -> int | None:
        return self.torch.cuda.max_memory_reserved() if self.cuda else None

    def release(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()


def model_fields(spec: str, seq: int, smoke: bool) -> dict:
    preset, mixer = spec.split(":")
    return dict(preset="tiny" if smoke else preset, mixer=mixer, seq_length=seq)


def largest_micro_batch(make, mem: Memory, args, log) -> tuple[int, object, dict]:
    """(micro-batch, an engine that has run it, search record); see the module docstring."""
    engine = make()
    device = "cuda" if mem.cuda else "cpu"
    record = {"probes": []}

    def probe(mb: int, note: str = "") -> int | None:
        tokens = synthetic_tokens(args.vocab, mb, args.seq, device, seed=mb)
        mem.reset()
        try:
            if args.simulate_oom_above and mb > args.simulate_oom_above:  # smoke runs: exercise the OOM path
                raise MemoryError(f"simulated out-of-memory at micro-batch {mb}")
            timed_step(engine, tokens)
        except Exception as err:
            if not mem.is_oom(err):
                raise
            record["probes"].append({"micro_batch": mb, "peak_gib": None})
            log(f"  micro-batch {mb}: out of memory ({str(err).splitlines()[0][:100]})")
            return None
        peak = mem.peak()
        record["probes"].append({"micro_batch": mb, "peak_gib": peak / GIB})
        log(f"  micro-batch {mb}: peak {peak / GIB:.2f} GiB{note}")
        return peak

    budget = args.memory_fraction * mem.capacity
    probe(1, " (first step: optimizer state, kernel compilation)")
    one = probe(1)
    two = probe(2) if one is not None and args.max_micro_batch >= 2 else None
    if one is None or one > budget:
        raise RuntimeError(f"micro-batch 1 does not fit ({record['probes']})")
    def fresh_engine():
        # An OOM mid-step may leave DeepSpeed's gradient buckets half-filled: the next step starts afresh.
        nonlocal engine
        del engine
        mem.release()
        engine = make()  # noqa: F841 - nonlocal: the caller reads it

    if two is None or two > budget:
        if two is None and args.max_micro_batch >= 2:
            fresh_engine()
        return 1, engine, record
    per_sample = max(two - one, 1)
    record["bytes_per_sample_gib"] = per_sample / GIB
    mb = max(2, min(args.max_micro_batch, int((budget - one) // per_sample) + 1))
    while mb > 2:
        peak = probe(mb)
        if peak is not None and peak <= budget:
            break
        if peak is None:
            fresh_engine()
        mb = max(2, int(mb * 0.85))
    return mb, engine, record


def bench_model(spec: str, args, mem: Memory, peak_flops: float | None, log) -> dict:
    import torch

    from hgrn_megatron.flops import count_parameters, flops_per_token

    cfg = run_config(model_fields(spec, args.seq, args.cpu_smoke), micro_batch_size=1, precision=args.precision,
                     zero_stage=1)
    params = count_parameters(cfg.model, args.vocab)
    log(f"{spec}: {params / 1e6:.0f} M parameters, seq {args.seq}, {args.precision}, ZeRO-1")
    started = time.perf_counter()
    make = lambda: build_engine(cfg, args.vocab)
    if args.micro_batch:
        engine, mb, search = make(), args.micro_batch, {"fixed": True}
    else:
        mb, engine, search = largest_micro_batch(make, mem, args, log)
    tokens = synthetic_tokens(args.vocab, mb, args.seq, "cuda" if mem.cuda else "cpu")
    for _ in range(args.warmup):
        timed_step(engine, tokens)
    mem.reset()
    times = [timed_step(engine, tokens) for _ in range(args.steps)]
    stats = spread(times)
    tokens_per_s = mb * args.seq / stats["median"]
    fpt = flops_per_token(cfg.model, args.vocab, args.seq)
    row = {
        "model": spec, "parameters": params, "micro_batch": mb, "seq_length": args.seq, "step_s": stats["median"],
        "step_spread": stats["spread"], "tokens_per_s": tokens_per_s, "peak_memory_gib": mem.peak() / GIB,
        "reserved_memory_gib": None if mem.reserved() is None else mem.reserved() / GIB,
        "flops_per_token": fpt, "achieved_tflops": fpt * tokens_per_s / 1e12,
        "mfu": fpt * tokens_per_s / peak_flops if peak_flops else None, "search": search,
        "wall_s": time.perf_counter() - started,
    }
    if args.profile and spec == args.profile:
        from profile_step import profile_training_step

        row["profile"] = profile_training_step(engine, tokens, top=20, cuda=mem.cuda)
    del engine, tokens
    mem.release()
    if mem.cuda:
        torch.cuda.reset_peak_memory_stats()
    return row


def print_table(rows: list[dict]) -> None:
    print("\n| model | params | micro-batch x seq | step s | tokens/s | peak mem GiB | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | | | | | | | {r['error'][:80]} |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"| {r['model']} | {r['parameters'] / 1e6:.0f} M | {r['micro_batch']} x {r['seq_length']} | "
              f"{r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['peak_memory_gib']:.1f} | "
              f"{r['achieved_tflops']:.1f} | {mfu} |")
    by = {r["model"]: r for r in rows if "error" not in r}
    for preset in sorted({m.split(":")[0] for m in by}):
        h, a = by.get(f"{preset}:hgrn"), by.get(f"{preset}:attention")
        if h and a:
            print(f"{preset}: HGRN / Transformer tokens/s = {h['tokens_per_s'] / a['tokens_per_s']:.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help=f"PRESET:MIXER (default: {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; smoke 128)")
    parser.add_argument("--vocab", type=int, default=None, help="padded vocabulary (default 50304; smoke 2048)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--micro-batch", type=int, help="skip the search and use this micro-batch")
    parser.add_argument("--max-micro-batch", type=int, default=None, help="search cap (default 64; smoke 4)")
    parser.add_argument("--memory-fraction", type=float, default=0.9, help="of device memory the search may fill")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 8; smoke 2)")
    parser.add_argument("--peak-tflops", type=float, help="dense peak for MFU (default: pretrain.metrics table)")
    parser.add_argument("--profile", metavar="PRESET:MIXER", help="also profile one step of this model")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: exercises the code paths")
    parser.add_argument("--cpu-budget-gib", type=float, default=None, help="smoke: memory budget (default: RSS now + 0.25)")
    parser.add_argument("--simulate-oom-above", type=int, help=argparse.SUPPRESS)  # smoke tests of the OOM path
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    args.models = args.models or (["tiny:hgrn", "tiny:attention"] if smoke else DEFAULT_MODELS)
    args.seq = args.seq or (128 if smoke else 2048)
    args.vocab = args.vocab or (2048 if smoke else 50304)
    args.max_micro_batch = args.max_micro_batch or (4 if smoke else 64)
    args.steps = args.steps or (2 if smoke else 8)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not smoke:
        print("gpu_train_step: no CUDA device (use --cpu-smoke to exercise the code on CPU)")
        return 2
    if smoke:
        cuda = False
    init_single_rank()
    from hgrn_megatron.pretrain.metrics import device_peak_flops

    if smoke and args.cpu_budget_gib is None:
        rss = int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:")).split()[1])
        args.cpu_budget_gib = rss * 1024 / GIB + 0.25
    mem = Memory(cuda, args.cpu_budget_gib or 1.0)
    peak_flops = args.peak_tflops * 1e12 if args.peak_tflops else device_peak_flops(args.precision) if cuda else None
    results = {"info": {**machine_info(), "precision": args.precision, "zero_stage": 1, "seq_length": args.seq,
                        "vocab": args.vocab, "peak_flops": peak_flops, "cpu_smoke": smoke,
                        "memory_capacity_gib": mem.capacity / GIB}, "rows": []}
    print(json.dumps(results["info"]), flush=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    for spec in args.models:
        try:
            row = bench_model(spec, args, mem, peak_flops, log)
        except Exception as err:  # noqa: BLE001 - one model failing must not hide the others
            row = {"model": spec, "error": f"{type(err).__name__}: {err}"[:500]}
            mem.release()
        log(json.dumps({k: v for k, v in row.items() if k not in ("profile", "search")}))
        results["rows"].append(row)
        if args.out:  # after every model, so a run cut short keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))
    print_table(results["rows"])
    return 0 if all("error" not in r for r in results["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
