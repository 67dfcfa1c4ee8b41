"""CPU benchmark: the fused CPU kernel and the vectorised torch scan against the float64 reference loop,
forward + backward, one process.

    python benchmarks/scan_cpu.py                         # B=4, T=4096, D=512, fp32, real and complex
    python benchmarks/scan_cpu.py --chunk-sizes 32 64 128 # also compare chunk sizes of the torch path
    python benchmarks/scan_cpu.py --pages-only --repeats 25  # the fused path's outputs: 2 MiB vs 4 KiB pages
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/scan_cpu.py  # with PyTorch's huge-page CPU allocations
    OMP_WAIT_POLICY=PASSIVE python benchmarks/scan_cpu.py # OpenMP threads sleep, not spin, at barriers

Runs alternate (reference, torch, reference, torch, ...) so that load from other processes hits both alike;
the figure reported is the ratio of medians, of wall-clock time and of this process's CPU time (user + system,
which includes page faults; with --threads 1 it is the stable figure on a shared machine).
Goal: the CPU training path (backend "auto" on CPU: the fused kernel) >= 20x the reference, fwd+bwd.

On a shared machine, OpenMP's default spin-waiting makes every parallel op wait for a descheduled sibling
thread; the torch path issues a few hundred such ops per call, so it can slow down tenfold. Compare
--threads 1 or OMP_WAIT_POLICY=PASSIVE (both must be chosen before torch starts; the variable is recorded).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from hgrn_megatron.kernels import cpu_scan as cpu_scan_module
from hgrn_megatron.kernels import hgrn_scan_reference
from hgrn_megatron.kernels.cpu_scan import cpu_scan, cpu_scan_available, cpu_scan_library
from hgrn_megatron.kernels.torch_scan import default_chunk_size, torch_scan


def make_inputs(B: int, T: int, D: int, complex_mode: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((B, T, D, 2) if complex_mode else (B, T, D), generator=gen).requires_grad_()
    g = torch.nn.functional.logsigmoid(2 + torch.randn(B, T, D, generator=gen)).requires_grad_()
    theta = torch.randn(D, generator=gen).requires_grad_() if complex_mode else None
    grad = torch.randn(x.shape, generator=gen)
    return x, g, theta, grad


def time_fwd_bwd(fn, x, g, theta, grad) -> tuple[float, float, float]:
    """Seconds (forward wall, forward+backward wall, forward+backward CPU) of `fn(x, g, theta) -> h`."""
    for t in (x, g, theta):
        if t is not None:
            t.grad = None
    cpu_start, start = time.process_time(), time.perf_counter()
    h = fn(x, g, theta)
    mid = time.perf_counter()
    h.backward(grad)
    end, cpu_end = time.perf_counter(), time.process_time()
    return mid - start, end - start, cpu_end - cpu_start


def kernel_into_buffers(x, g, theta, grad):
    """A timer of the fused kernel alone, called directly into output buffers allocated once: what it costs
    without autograd and without first-touch page faults of fresh outputs (which `cpu (fused)` pays)."""
    lib = cpu_scan_library()
    B, T, D = g.shape
    xs, gs, dout = x.detach().contiguous(), g.detach().contiguous(), grad.contiguous()
    cos_sin = (theta.detach().double().cos(), theta.detach().double().sin()) if theta is not None else (None, None)
    h, dx, dg = torch.empty_like(xs), torch.empty_like(xs), torch.empty_like(gs)
    dtheta_rows = torch.empty(B, D, dtype=torch.float64)
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731

    def timer(*_):
        threads = torch.get_num_threads()
        cpu_start, start = time.process_time(), time.perf_counter()
        lib.hgrn_cpu_scan_forward_f32(ptr(xs), ptr(gs), ptr(cos_sin[0]), ptr(cos_sin[1]), None, None, ptr(h),
                                      B, T, D, threads)
        mid = time.perf_counter()
        lib.hgrn_cpu_scan_backward_f32(ptr(gs), ptr(cos_sin[0]), ptr(cos_sin[1]), None, ptr(h), None, ptr(dout),
                                       None, ptr(dx), ptr(dg), None, ptr(dtheta_rows), B, T, D, threads)
        end, cpu_end = time.perf_counter(), time.process_time()
        return mid - start, end - start, cpu_end - cpu_start

    return timer


def small_pages(timer):
    """`timer` with the kernel's outputs left to 4 KiB pages (no huge-page advice): what that advice saves."""
    def timed(*args):
        cpu_scan_module.advise_huge_pages = False
        try:
            return timer(*args)
        finally:
            cpu_scan_module.advise_huge_pages = True
    return timed


def bench_variant(B, T, D, complex_mode, repeats, chunk_sizes, pages_only=False) -> dict:
    x, g, theta, grad = make_inputs(B, T, D, complex_mode)

    def autograd_timer(fn):
        return lambda x, g, theta, grad: time_fwd_bwd(fn, x, g, theta, grad)

    if pages_only:  # the fused path alone, as a training loop calls it: the same shapes again and again
        fused = autograd_timer(lambda x, g, theta: cpu_scan(x, g, theta=theta)[0])
        timers = {"cpu (fused), outputs in 4 KiB pages": small_pages(fused), "cpu (fused)": fused}
        chunk_sizes = []
    else:
        timers = {"reference": autograd_timer(lambda x, g, theta: hgrn_scan_reference(x, g, theta=theta)[0])}
    if cpu_scan_available() and not pages_only:
        timers["cpu (fused)"] = autograd_timer(lambda x, g, theta: cpu_scan(x, g, theta=theta)[0])
        timers["cpu (fused), outputs in 4 KiB pages"] = small_pages(timers["cpu (fused)"])
        timers["cpu kernel alone, outputs reused"] = kernel_into_buffers(x, g, theta, grad)
    for L in chunk_sizes:
        timers[f"torch L={L}"] = autograd_timer(
            lambda x, g, theta, L=L: torch_scan(x, g, theta=theta, chunk_size=L)[0])
    for timer in timers.values():  # warm-up: first calls pay one-off costs
        timer(x, g, theta, grad)
    samples = {name: [] for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            samples[name].append(timer(x, g, theta, grad))
    result = {}
    for name, runs in samples.items():
        result[name] = {"fwd_ms": 1e3 * statistics.median(r[0] for r in runs),
                        "fwd_bwd_ms": 1e3 * statistics.median(r[1] for r in runs),
                        "fwd_bwd_cpu_ms": 1e3 * statistics.median(r[2] for r in runs)}
    ref = next(iter(result.values()))  # the baseline: the first timer
    for r in result.values():
        r["speedup_fwd_bwd"] = ref["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        r["speedup_fwd_bwd_cpu"] = ref["fwd_bwd_cpu_ms"] / r["fwd_bwd_cpu_ms"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--variants", nargs="+", default=["real", "complex"], choices=["real", "complex"])
    parser.add_argument("--chunk-sizes", nargs="+", type=int, help="torch path chunk sizes (default: its default)")
    parser.add_argument("--pages-only", action="store_true",
                        help="time only the fused path, its outputs in 2 MiB against 4 KiB pages (the baseline)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    chunk_sizes = args.chunk_sizes or [default_chunk_size(args.seq)]
    info = {"date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "unset"),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset"),
            "load_average_1min": os.getloadavg()[0],
            "shape": f"B={args.batch} T={args.seq} D={args.dim} fp32", "repeats": args.repeats}
    print(json.dumps(info), flush=True)
    results = {}
    print("| variant | implementation | fwd ms | fwd+bwd ms | speed-up | fwd+bwd CPU ms | speed-up (CPU time) |")
    print("|---|---|---|---|---|---|---|")
    for variant in args.variants:
        results[variant] = bench_variant(args.batch, args.seq, args.dim, variant == "complex", args.repeats,
                                         chunk_sizes, args.pages_only)
        for name, r in results[variant].items():
            print(f"| {variant} | {name} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | {r['speedup_fwd_bwd']:.1f}x | "
                  f"{r['fwd_bwd_cpu_ms']:.1f} | {r['speedup_fwd_bwd_cpu']:.1f}x |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
