"""How long a checkpoint save blocks training, synchronous against background writes; how fast a checkpoint
converts for another DP/TP size with 1 and with N worker processes.

    python benchmarks/checkpoint_io.py [--hidden 512 --layers 4 --vocab 8192] [--repeats 3] [--dir DIR]

Part 1, one rank: the trainer's engine (fp32, ZeRO 1, torch AdamW after one step, so the optimizer state exists)
saves through two `pretrain.checkpoint.Checkpointer`s, one synchronous and one with `background=True`, in turn;
it reports the time `save()` blocks (the training step's share) and, for background saves, the time until the
checkpoint is committed. The first background save allocates the host buffers that later ones reuse: it is
reported apart. Part 2: checkpoints saved at DP 2 and at TP 2 (two gloo ranks each) are converted to
DeepSpeed's universal format by `hgrn-checkpoint reshard` in a fresh process, as the trainer runs it, with 1
and with `--workers` processes, in turn; it reports the command's wall time and the conversion's own (the
command's figure, without the interpreter's start and imports). Ratios compare the minima of interleaved runs
(the machine may be shared: the load average is printed with them).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_engine, init_single_rank, run_config  # noqa: E402


def _engine(args):
    import torch

    cfg = run_config({"hidden_size": args.hidden, "num_layers": args.layers, "ffn_hidden_size": 3 * args.hidden,
                      "num_attention_heads": 8, "seq_length": 64}, micro_batch_size=1)
    engine = build_engine(cfg, args.vocab)
    tokens = torch.randint(0, args.vocab, (1, 65))
    loss = engine(tokens[:, :-1], labels=tokens[:, 1:]).float().mean()
    engine.backward(loss)
    engine.step()  # AdamW state now exists
    return engine


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def blocking_times(args, root: Path) -> dict:
    from hgrn_megatron.pretrain.checkpoint import Checkpointer, RetentionPolicy, verify_checkpoint

    init_single_rank()
    engine = _engine(args)
    run_state = {"vocab_size": args.vocab, "step": 0}
    keep = RetentionPolicy(keep_last=1)
    savers = {False: Checkpointer(engine, root, keep), True: Checkpointer(engine, root, keep, background=True)}
    out = {"sync_s": [], "async_block_s": [], "async_commit_s": [], "load_average": [os.getloadavg()[0]]}
    for step in range(1, 2 * args.repeats + 3):  # interleaved, so that both see the same page-cache and disk state
        background = step % 2 == 0
        t0 = time.perf_counter()
        savers[background].save(step, run_state, {}, "{}\n")
        t1 = time.perf_counter()
        savers[background].finish()
        t2 = time.perf_counter()
        if step == 2:
            out["first_async_block_s"] = t1 - t0  # allocates the host buffers
        elif background:
            out["async_block_s"].append(t1 - t0)
            out["async_commit_s"].append(t2 - t0)
        elif step > 1:
            out["sync_s"].append(t1 - t0)
        assert verify_checkpoint(root / f"step-{step:08d}") is None
    out["load_average"].append(os.getloadavg()[0])
    out["checkpoint_mb"] = _bytes(root / f"step-{step:08d}") / 1e6
    out["parameters_m"] = sum(p.numel() for p in engine.module.parameters()) / 1e6
    out["host_buffer_mb"] = savers[True].writer._snapshot.nbytes() / 1e6
    return out


def _save_at(args, root: str, tp: int):
    """A rank of a 2-rank job at TP `tp` (DP 2 / tp): one step, then a checkpoint."""
    from hgrn_megatron.pretrain.checkpoint import RetentionPolicy, save_checkpoint
    from hgrn_megatron.pretrain.distributed import init_model_parallel
    from hgrn_megatron.pretrain.engine import build_engine as build
    from hgrn_megatron.runtime_env import patch_for_cpu

    patch_for_cpu()
    init_model_parallel(tp)
    import torch

    cfg = run_config({"hidden_size": args.hidden, "num_layers": args.layers, "ffn_hidden_size": 3 * args.hidden,
                      "num_attention_heads": 8, "seq_length": 64}, micro_batch_size=1)
    cfg.train.global_batch_size = 2 // tp
    cfg.parallel.tensor_parallel_size = tp
    engine = build(cfg, args.vocab, dp_size=2 // tp)
    torch.manual_seed(0)  # the same tokens on both ranks (TP ranks must see the same batch)
    tokens = torch.randint(0, args.vocab, (1, 65))
    engine.backward(engine(tokens[:, :-1], labels=tokens[:, 1:]).float().mean())
    engine.step()
    save_checkpoint(engine, Path(root), 1, {"vocab_size": args.vocab, "step": 1}, {}, "{}\n",
                    RetentionPolicy(keep_last=1))


def _reshard(ckpt: Path, workers: int) -> tuple[float, float]:
    """(wall seconds of `hgrn-checkpoint reshard` in a fresh process, the conversion's seconds it reports)."""
    from hgrn_megatron.pretrain.checkpoint import DS_UNIVERSAL_TAG

    shutil.rmtree(ckpt / DS_UNIVERSAL_TAG, ignore_errors=True)
    cmd = [sys.executable, "-m", "hgrn_megatron.pretrain.checkpoint.reshard", "reshard", str(ckpt),
           "--workers", str(workers)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    return wall, float(re.search(r"workers, ([0-9.]+) s\)", done.stdout).group(1))


def reshard_times(args, root: Path) -> dict:
    from hgrn_megatron.testing.distributed import run_distributed

    out = {}
    for layout, tp in (("dp2", 1), ("tp2", 2)):
        run_distributed(_save_at, world_size=2, args=(args, str(root / layout), tp), timeout=1800)
        ckpt = root / layout / "step-00000001"
        r = out[layout] = {"checkpoint_mb": _bytes(ckpt / "ds") / 1e6, "load_average": [os.getloadavg()[0]]}
        for workers in (1, args.workers) * args.repeats:
            wall, conversion = _reshard(ckpt, workers)
            r.setdefault(f"{workers}_workers_wall_s", []).append(wall)
            r.setdefault(f"{workers}_workers_conversion_s", []).append(conversion)
        r["load_average"].append(os.getloadavg()[0])
    return out


def _report_reshard(result: dict, workers: int) -> None:
    for layout, r in result.items():
        for what in ("wall", "conversion"):
            one, many = min(r[f"1_workers_{what}_s"]), min(r[f"{workers}_workers_{what}_s"])
            print(f"reshard {layout}->1, {r['checkpoint_mb']:.0f} MB, {what}: 1 worker {one:.2f} s, {workers} "
                  f"workers {many:.2f} s ({many / one:.2f} x; minima of {len(r['1_workers_wall_s'])}; load "
                  f"average {r['load_average'][0]:.1f} -> {r['load_average'][1]:.1f})")


def _report_save(s: dict) -> None:
    sync, block = min(s["sync_s"]), min(s["async_block_s"])
    med_sync, med_block = statistics.median(s["sync_s"]), statistics.median(s["async_block_s"])
    print(f"model {s['parameters_m']:.1f} M parameters, checkpoint {s['checkpoint_mb']:.0f} MB, host buffers "
          f"{s['host_buffer_mb']:.0f} MB; load average {s['load_average'][0]:.1f} -> {s['load_average'][1]:.1f}")
    print(f"synchronous save: min {sync:.3f} s, median {med_sync:.3f} s")
    print(f"background save blocks: min {block:.3f} s ({100 * block / sync:.1f} % of the synchronous min), "
          f"median {med_block:.3f} s ({100 * med_block / med_sync:.1f} % of the synchronous median); the first "
          f"(allocating the buffers) {s['first_async_block_s']:.3f} s; committed after "
          f"{statistics.median(s['async_commit_s']):.3f} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="conversion processes to compare with 1")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--skip-reshard", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from hgrn_megatron.runtime_env import configure_environment

    configure_environment()  # before the rank processes fork and import DeepSpeed
    base = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir))
    try:
        result = {}
        if not args.skip_reshard:  # first: it forks rank processes, which must not inherit a writer thread
            result["reshard"] = reshard_times(args, base / "reshard")
            _report_reshard(result["reshard"], args.workers)
        result["save"] = blocking_times(args, base / "save")
        _report_save(result["save"])
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
