"""The context-parallel rows of `train_throughput.py` (`--context-parallel T`): the trainer's step on one T-token
sequence at CP 1 and CP 2 on the same cores. See that file's docstring; run it through that file:

    python benchmarks/train_throughput.py --context-parallel 65536
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from common import build_engine, machine_info, run_config, spread, synthetic_tokens

from hgrn_megatron.testing.memory import saved_tensor_bytes

CP_MODEL = dict(hidden_size=128, num_layers=2, ffn_hidden_size=256, num_attention_heads=4)  # context_parallel.py's
CP_VOCAB = 256


def cp_rank_steps(args, cp: int, threads: int) -> dict:
    """Rank function (one gloo rank of a CP-sized world): the trainer's step at CP `cp` on this rank's piece of
    one T-token sequence; step times, losses and the bytes the forward pass saves."""
    import torch
    from megatron.core import parallel_state

    from hgrn_megatron.context_parallel import sequence_piece
    from hgrn_megatron.pretrain.data import model_inputs
    from hgrn_megatron.pretrain.distributed import init_model_parallel

    torch.set_num_threads(threads)
    init_model_parallel(1, cp)
    group = parallel_state.get_context_parallel_group()
    seq = args.context_parallel
    cfg = run_config({"preset": "tiny", **CP_MODEL, "seq_length": seq, "reset_at_document_boundary": True},
                     micro_batch_size=1)
    cfg.parallel.context_parallel_size = cp
    engine = build_engine(cfg, CP_VOCAB)
    tokens = synthetic_tokens(CP_VOCAB, 1, seq, "cpu", seed=seq)
    doc_start = torch.zeros(1, seq + 1, dtype=torch.bool)
    doc_start[0, [0, seq // 3, seq // 2 + 7]] = True  # documents cross the CP 2 boundary
    x = model_inputs({"tokens": tokens, "doc_start": doc_start})
    x = type(x)(*(None if t is None else sequence_piece(t, group) for t in x))

    def step() -> float:
        loss = engine(x.input_ids, labels=x.labels, doc_start=x.doc_start).float().mean()
        engine.backward(loss)
        engine.step()
        whole = loss.detach().clone()  # equal pieces: the sequence's mean loss is the mean of the pieces' means
        torch.distributed.all_reduce(whole, group=group)
        return whole.item() / cp

    step()  # warm-up: allocates the optimizer state
    times, cpu_times, losses = [], [], []
    for _ in range(args.rounds):
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(step())
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    loss, saved = saved_tensor_bytes(
        lambda: engine(x.input_ids, labels=x.labels, doc_start=x.doc_start).float().mean(), engine.module.parameters())
    del loss
    return {"cp": cp, "threads": threads, "times": times, "cpu_times": cpu_times, "losses": losses,
            "saved_bytes": saved}


def measure_context_parallel(args) -> dict:
    """CP 1 (on one core and on `args.cores`) then CP 2 on the same cores; a row each and the ratios of CP 2 to
    the faster CP 1 row."""
    from hgrn_megatron.testing.distributed import run_distributed

    rows = []
    # CP 1 on one core as well as on all of them: on a shared host two OpenMP threads of one rank can wait on
    # each other far longer than they gain (see --threads above)
    layouts = list(dict.fromkeys([(1, 1), (1, args.cores), (2, max(1, args.cores // 2))]))
    for cp, threads in layouts:
        ranks = run_distributed(cp_rank_steps, world_size=cp, args=(args, cp, threads), timeout=3600)
        # a step ends when the slowest rank's does; every rank reports the whole sequence's loss
        times = [max(r["times"][i] for r in ranks) for i in range(args.rounds)]
        timing = spread(times)
        # CPU-seconds of all ranks together: the work a step costs, less disturbed by other jobs than wall time
        cpu = spread([sum(r["cpu_times"][i] for r in ranks) for i in range(args.rounds)])
        rows.append({"cp": cp, "ranks": cp, "threads_per_rank": ranks[0]["threads"], "seq_length": args.context_parallel,
                     "step_s": timing["median"], "spread": timing["spread"], "samples": times,
                     "tokens_per_s": args.context_parallel / timing["median"],
                     "cpu_s": cpu["median"], "tokens_per_cpu_s": args.context_parallel / cpu["median"],
                     "saved_bytes_per_rank": max(r["saved_bytes"] for r in ranks), "losses": ranks[0]["losses"]})
        print(f"CP {cp}, {cp} x {threads} threads: step {timing['median']:.1f} s, losses {ranks[0]['losses']}",
              flush=True)
    one, two = max(rows[:-1], key=lambda r: r["tokens_per_s"]), rows[-1]  # CP 2 against CP 1's better layout
    return {"rows": rows, "goals": {
        "tokens/s at CP 2 / CP 1": two["tokens_per_s"] / one["tokens_per_s"],
        "tokens per CPU-s (all ranks) at CP 2 / CP 1": two["tokens_per_cpu_s"] / one["tokens_per_cpu_s"],
        "saved bytes per rank at CP 2 / CP 1": two["saved_bytes_per_rank"] / one["saved_bytes_per_rank"],
        "largest loss difference CP 2 - CP 1": max(abs(a - b) for r in rows[:-1]
                                                   for a, b in zip(r["losses"], two["losses"]))}}


def print_context_parallel(result: dict) -> None:
    print("\n| CP | ranks x threads | T | step s (median) | spread | tokens/s | CPU-s / step | tokens/CPU-s | "
          "saved MiB / rank | losses |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in result["rows"]:
        print(f"| {r['cp']} | {r['ranks']} x {r['threads_per_rank']} | {r['seq_length']:,} | {r['step_s']:.1f} | "
              f"{100 * r['spread']:.0f}% | {r['tokens_per_s']:,.0f} | {r['cpu_s']:.1f} | {r['tokens_per_cpu_s']:,.0f} | "
              f"{r['saved_bytes_per_rank'] / 2**20:.1f} | "
              + ", ".join(f"{v:.6f}" for v in r["losses"]) + " |")
    for name, value in result["goals"].items():
        print(f"{name}: {value:.3g}")



def context_parallel_main(args) -> int:
    from hgrn_megatron.runtime_env import configure_environment, patch_for_cpu

    if args.context_parallel % 2:
        raise SystemExit(f"--context-parallel {args.context_parallel}: T must split into 2 pieces")
    configure_environment()
    patch_for_cpu()
    import hgrn_megatron.pretrain.engine  # noqa: F401  loaded once, before the ranks fork

    info = {**machine_info(), "model": CP_MODEL | {"vocab": CP_VOCAB, "seq_length": args.context_parallel},
            "cores": args.cores, "precision": "fp32", "zero_stage": 1, "rounds": args.rounds}
    print(json.dumps(info), flush=True)
    result = measure_context_parallel(args)
    print_context_parallel(result)
    json_path = Path(args.json or "runs/bench/train_throughput_cp.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"info": info, **result}, indent=1))
    print(f"wrote {json_path}")
    return 0
