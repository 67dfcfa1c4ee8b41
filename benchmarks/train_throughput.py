"""End-to-end training throughput on CPU: HGRN against the same-size Transformer, T = 512 ... 8192.

    python benchmarks/train_throughput.py --threads 1 --png docs/throughput.png   # the sweep (~8 min on 2 cores)
    python benchmarks/train_throughput.py --seq-lengths 512 8192 --rounds 2 --no-memory   # a quick look
    python benchmarks/train_throughput.py --threads 1 --profile hgrn:8192  # where one step's time goes
    python benchmarks/train_throughput.py --context-parallel 65536      # CP 2 against CP 1 on the same 2 cores

On a host shared with other jobs use `--threads 1`: with more, OpenMP threads spin waiting for a descheduled
sibling and step times swing by 2x; on a dedicated machine leave torch's default.

Each step is the trainer's step through the real engine (`pretrain.engine.build_engine`: megatron-core model,
torch AdamW, DeepSpeed ZeRO-1, fp32, one rank) on synthetic tokens (see benchmarks/common.py). Both models share
width, depth, SwiGLU MLP, vocabulary and norms; only the token mixer differs (HGRU vs megatron's self-attention
with torch's scaled_dot_product_attention). Every sequence length gets the same tokens per step
(micro-batch = tokens / T, one micro-batch per step), so tokens/s is directly comparable across T.

Timing: all engines are built first, then every configuration takes one step per round, the order reversed
on alternate rounds, so load from other processes hits all of them alike; the figure is the median step.

Memory, two figures per configuration, measured in a child process (so they do not disturb the timing):
- activations: bytes of the distinct storages autograd saves for the backward pass during the forward pass
  (`torch.autograd.graph.saved_tensors_hooks`, weights excluded): exact and free of allocator noise, and it
  is what grows with T if anything does;
- peak RSS growth over one whole training step (Linux `VmHWM` after resetting it through
  `/proc/self/clear_refs`, minus `VmRSS` before the step), with glibc told to return every block of 64 KiB
  or more to the OS when freed (`MALLOC_MMAP_THRESHOLD_`), so RSS follows live tensor memory; this adds the
  backward's temporaries and the gradients. tracemalloc cannot be used: it sees Python's allocator only,
  not torch's.
Context-parallel rows (`--context-parallel T`): one sequence of T tokens per step through the same engine, at
CP 1 (one rank, one torch thread and `--cores` threads) and CP 2 (two gloo ranks, each holding its contiguous
half of the sequence, `--cores` / 2 threads each), so CP 2 and the second CP 1 row use the same cores; the small model of
`benchmarks/context_parallel.py` with document resets. Reported: tokens/s (median step), the step loss (equal
at CP 1 and CP 2), and the saved activations per rank.
Goals: HGRN tokens/s at 8192 >= 0.8 x at 512; HGRN >= 2 x the Transformer at 8192; HGRN
activation memory per token flat in T.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import (
    build_engine,
    init_single_rank,
    machine_info,
    run_config,
    spread,
    synthetic_tokens,
    timed_step,
)

from hgrn_megatron.mixers import MIXERS as REGISTERED_MIXERS
from hgrn_megatron.mixers import get_mixer
from hgrn_megatron.testing.memory import saved_tensor_bytes

MIXERS = ("hgrn", "attention")  # the default sweep: HGRN against its Transformer baseline
KIB = 1024


def model_fields(args, mixer: str, seq: int) -> dict:
    return dict(preset="tiny", mixer=mixer, hidden_size=args.hidden, num_layers=args.layers,
                ffn_hidden_size=args.ffn, num_attention_heads=args.heads, seq_length=seq)


def make_engine(args, mixer: str, seq: int):
    micro = args.tokens_per_step // seq
    cfg = run_config(model_fields(args, mixer, seq), micro_batch_size=micro)
    return build_engine(cfg, args.vocab), synthetic_tokens(args.vocab, micro, seq, "cpu", seed=seq)


def configurations(args) -> list[tuple[str, int]]:
    return [(mixer, seq) for seq in args.seq_lengths for mixer in args.mixers]


# ---------------------------------------------------------------------------------------------- timing
def measure_speed(args) -> dict:
    engines = {key: make_engine(args, *key) for key in configurations(args)}
    for engine, tokens in engines.values():
        for _ in range(args.warmup):
            timed_step(engine, tokens)
    samples = {key: [] for key in engines}
    cpu_samples = {key: [] for key in engines}
    for r in range(args.rounds):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))
        for key in order:
            cpu_start = time.process_time()
            samples[key].append(timed_step(*engines[key]))
            cpu_samples[key].append(time.process_time() - cpu_start)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{m}@{s} {samples[(m, s)][-1]:.2f}s" for m, s in order),
              flush=True)
    out = {}
    for (m, s), wall in samples.items():
        cpu = spread(cpu_samples[(m, s)])
        out[f"{m}:{s}"] = {**spread(wall), "tokens_per_s": args.tokens_per_step / spread(wall)["median"],
                           "samples": wall, "cpu_s": cpu, "tokens_per_cpu_s": args.tokens_per_step / cpu["median"]}
    return out


# ---------------------------------------------------------------------------------------------- memory
def saved_activation_bytes(engine, tokens) -> int:
    """Bytes autograd keeps for the backward pass of one forward pass (distinct storages, weights excluded)."""
    from hgrn_megatron.pretrain.data import model_inputs

    x = model_inputs(tokens)
    loss, nbytes = saved_tensor_bytes(lambda: engine(x.input_ids, labels=x.labels).float().mean(),
                                      engine.module.parameters())
    engine.backward(loss)  # completes the step, so the engine's state stays as the trainer leaves it
    engine.step()
    return nbytes


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_rss_growth(engine, tokens) -> int | None:
    """Bytes by which the resident set peaks above its level before one training step (None if unsupported)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        before = _status_kib("VmRSS")
    except (OSError, RuntimeError):
        return None
    timed_step(engine, tokens)
    return (_status_kib("VmHWM") - before) * KIB


def measure_memory(args) -> dict:
    """One configuration at a time (the others freed), in a process started with MALLOC_MMAP_THRESHOLD_ set."""
    out = {}
    for mixer, seq in configurations(args):
        engine, tokens = make_engine(args, mixer, seq)
        timed_step(engine, tokens)  # allocates the optimizer state
        saved = saved_activation_bytes(engine, tokens)
        peak = peak_rss_growth(engine, tokens)
        tokens_per_step = tokens.shape[0] * (tokens.shape[1] - 1)
        out[f"{mixer}:{seq}"] = {"activation_bytes": saved, "activation_bytes_per_token": saved / tokens_per_step,
                                 "peak_rss_growth_bytes": peak,
                                 "peak_rss_growth_per_token": None if peak is None else peak / tokens_per_step}
        print(f"memory {mixer}@{seq}: activations {saved / tokens_per_step / KIB:.1f} KiB/token, peak RSS growth "
              f"{'n/a' if peak is None else f'{peak / tokens_per_step / KIB:.1f} KiB/token'}", flush=True)
        del engine, tokens
        gc.collect()
    return out


def memory_in_child(args) -> dict:
    """Run `measure_memory` in a fresh process whose malloc returns large blocks to the OS when freed."""
    out = Path(args.json or "runs/bench/train_throughput.json").with_suffix(".memory.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-only", "--json", str(out), *passthrough(args)]
    # The child starts its own one-rank process group: it must not inherit this process's rendezvous variables.
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(MALLOC_MMAP_THRESHOLD_=str(64 * KIB), MALLOC_TRIM_THRESHOLD_=str(64 * KIB))
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


def passthrough(args) -> list[str]:
    return ["--hidden", str(args.hidden), "--layers", str(args.layers), "--ffn", str(args.ffn), "--heads",
            str(args.heads), "--vocab", str(args.vocab), "--tokens-per-step", str(args.tokens_per_step),
            "--seq-lengths", *map(str, args.seq_lengths), "--mixers", *args.mixers,
            *(["--threads", str(args.threads)] if args.threads else [])]


# ---------------------------------------------------------------------------------------------- report
def summarize(args, speed: dict, memory: dict | None) -> dict:
    rows, goals = [], {}
    for mixer, seq in configurations(args):
        key = f"{mixer}:{seq}"
        row = {"mixer": mixer, "seq_length": seq, "micro_batch": args.tokens_per_step // seq,
               "step_s": speed[key]["median"], "spread": speed[key]["spread"],
               "tokens_per_s": speed[key]["tokens_per_s"], "tokens_per_cpu_s": speed[key]["tokens_per_cpu_s"]}
        if memory:
            row.update({k: memory[key][k] for k in ("activation_bytes_per_token", "peak_rss_growth_per_token")})
        rows.append(row)
    by = {(r["mixer"], r["seq_length"]): r for r in rows}
    lo, hi = min(args.seq_lengths), max(args.seq_lengths)

    def ratio(a, b, field):
        return by[a][field] / by[b][field]

    # Each ratio twice: from wall-clock tokens/s (what a user sees) and from tokens per CPU-second of this
    # process, which other processes' load disturbs much less on a shared machine.
    if ("hgrn", lo) in by and ("hgrn", hi) in by:
        goals[f"hgrn tokens/s at {hi} / at {lo} (goal >= 0.8)"] = {
            f: ratio(("hgrn", hi), ("hgrn", lo), f) for f in ("tokens_per_s", "tokens_per_cpu_s")}
    for seq in args.seq_lengths:
        if ("hgrn", seq) in by and ("attention", seq) in by:
            goals[f"hgrn / transformer tokens/s at {seq}" + (" (goal >= 2)" if seq == hi else "")] = {
                f: ratio(("hgrn", seq), ("attention", seq), f) for f in ("tokens_per_s", "tokens_per_cpu_s")}
    if memory and ("hgrn", lo) in by and ("hgrn", hi) in by:
        goals[f"hgrn activation bytes/token at {hi} / at {lo} (goal: flat, 1.0)"] = {
            "activation_bytes_per_token": ratio(("hgrn", hi), ("hgrn", lo), "activation_bytes_per_token")}
    return {"rows": rows, "goals": goals}


def print_table(summary: dict, memory: bool) -> None:
    head = "| model | T | micro-batch | step s (median) | spread | tokens/s | tokens/CPU-s |"
    if memory:
        head += " activations KiB/token | peak RSS growth KiB/token |"
    print("\n" + head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in summary["rows"]:
        name = get_mixer(r["mixer"]).title
        line = (f"| {name} | {r['seq_length']} | {r['micro_batch']} | {r['step_s']:.2f} | {100 * r['spread']:.0f}% | "
                f"{r['tokens_per_s']:,.0f} | {r['tokens_per_cpu_s']:,.0f} |")
        if memory:
            peak = r.get("peak_rss_growth_per_token")
            line += f" {r['activation_bytes_per_token'] / KIB:.1f} | {'n/a' if peak is None else f'{peak / KIB:.1f}'} |"
        print(line)
    print()
    for name, values in summary["goals"].items():
        print(f"{name}: " + ", ".join(f"{v:.2f} ({k})" for k, v in values.items()))


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_memory = "activation_bytes_per_token" in summary["rows"][0]
    fig, axes = plt.subplots(1, 2 if has_memory else 1, figsize=(11 if has_memory else 6, 4.2), squeeze=False)
    styles = {"hgrn": ("HGRN", "tab:blue"), "attention": ("Transformer", "tab:red")}
    for mixer, (label, color) in styles.items():
        rows = [r for r in summary["rows"] if r["mixer"] == mixer]
        if not rows:
            continue
        seqs = [r["seq_length"] for r in rows]
        axes[0][0].plot(seqs, [r["tokens_per_s"] for r in rows], "o-", color=color, label=label)
        if has_memory:
            axes[0][1].plot(seqs, [r["activation_bytes_per_token"] / KIB for r in rows], "o-", color=color,
                            label=f"{label}: saved activations")
            if rows[0].get("peak_rss_growth_per_token") is not None:
                axes[0][1].plot(seqs, [r["peak_rss_growth_per_token"] / KIB for r in rows], "s--", color=color,
                                alpha=0.6, label=f"{label}: peak RSS growth")
    axes[0][0].set(ylabel="training tokens / s", title="throughput (same tokens per step)")
    if has_memory:
        axes[0][1].set(ylabel="KiB per token", title="memory per token")
    seqs = sorted({r["seq_length"] for r in summary["rows"]})
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqs, [str(s) for s in seqs])
        ax.set_xlabel("sequence length T")
        ax.set_ylim(0, 1.2 * max(line.get_ydata().max() for line in ax.get_lines()))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- profile
def profile_step(args, spec: str) -> dict:
    """Profile one training step of `mixer:T`: phase split, top ops, and self time by source location."""
    from profile_step import profile_training_step

    mixer, seq = spec.split(":")
    engine, tokens = make_engine(args, mixer, int(seq))
    for _ in range(max(1, args.warmup)):
        timed_step(engine, tokens)
    return profile_training_step(engine, tokens, top=args.top)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--mixers", nargs="+", choices=list(REGISTERED_MIXERS), default=list(MIXERS))
    parser.add_argument("--tokens-per-step", type=int, default=8192)
    # The model: a 4-layer, d = 256 member of the presets' family (~5 M parameters with the 2048-piece vocabulary):
    # big enough that matmuls dominate a step, small enough for the sweep to finish in minutes on two cores.
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=768)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory pass (child process)")
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write the results here (default: runs/bench/train_throughput.json)")
    parser.add_argument("--png", help="write the plot here (e.g. docs/throughput.png)")
    parser.add_argument("--profile", metavar="MIXER:T", help="profile one step of one configuration instead")
    parser.add_argument("--plot-only", metavar="JSON", help="redraw --png from a results file of this script")
    parser.add_argument("--top", type=int, default=25, help="rows of the profile tables")
    parser.add_argument("--context-parallel", type=int, metavar="T",
                        help="instead of the sweep: one T-token sequence per step at CP 1 and CP 2 (--rounds steps)")
    parser.add_argument("--cores", type=int, default=2, help="with --context-parallel: torch threads in all")
    args = parser.parse_args(argv)
    if args.context_parallel:
        from train_throughput_cp import context_parallel_main

        return context_parallel_main(args)
    if args.profile:
        if ":" not in args.profile or args.profile.split(":")[0] not in MIXERS:
            parser.error(f"--profile wants MIXER:T with MIXER in {MIXERS}, got {args.profile!r}")
        args.seq_lengths = [int(args.profile.split(":")[1])]
    for seq in args.seq_lengths:
        if args.tokens_per_step % seq:
            parser.error(f"--tokens-per-step {args.tokens_per_step} is not a multiple of sequence length {seq}")

    if args.plot_only:
        plot_results(json.loads(Path(args.plot_only).read_text()), Path(args.png or "docs/throughput.png"))
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    init_single_rank()
    json_path = Path(args.json or "runs/bench/train_throughput.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    if args.memory_only:
        json_path.write_text(json.dumps(measure_memory(args), indent=1))
        return 0
    info = {**machine_info(), "model": model_fields(args, "hgrn", 0) | {"vocab": args.vocab, "seq_length": None},
            "tokens_per_step": args.tokens_per_step, "precision": "fp32", "zero_stage": 1}
    print(json.dumps(info), flush=True)
    if args.profile:
        result = {"info": info, "profile": profile_step(args, args.profile)}
        json_path.write_text(json.dumps(result, indent=1))
        return 0

    started = time.perf_counter()
    speed = measure_speed(args)
    json_path.write_text(json.dumps({"info": info, "speed": speed}, indent=1))  # kept if the memory pass fails
    memory = None if args.no_memory else memory_in_child(args)
    summary = summarize(args, speed, memory)
    info["wall_s"] = time.perf_counter() - started
    print_table(summary, memory is not None)
    json_path.write_text(json.dumps({"info": info, "speed": speed, "memory": memory, **summary}, indent=1))
    print(f"wrote {json_path}")
    if args.png:
        plot_results(json.loads(json_path.read_text()), Path(args.png))
    return 0


def plot_results(results: dict, png: Path) -> None:
    info, model = results["info"], results["info"]["model"]
    plot(results, png, f"one rank, fp32, ZeRO-1; d={model['hidden_size']}, {model['num_layers']} layers, SwiGLU "
         f"{model['ffn_hidden_size']}, vocab {model['vocab']}; {info['tokens_per_step']} tokens/step; {info['date']}, "
         f"{info['cpu_count']} CPU cores (shared), {info['torch_threads']} torch thread(s)")
    print(f"wrote {png}")


if __name__ == "__main__":
    sys.exit(main())
