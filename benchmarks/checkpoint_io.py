"""How long a checkpoint save blocks training, synchronous against background writes; how fast a checkpoint
converts for another DP/TP size with 1 and with N worker processes.

    python benchmarks/checkpoint_io.py [--hidden 512 --layers 4 --vocab 8192] [--repeats 3] [--dir DIR]

Part 1, one rank: the trainer's engine (fp32, ZeRO 1, torch AdamW after one step, so the optimizer state exists)
saves through `pretrain.checkpoint.Checkpointer`, synchronously and with `background=True`; it reports the
time `save()` blocks (the training step's share) and, for background saves, the time until the checkpoint is
committed. Part 2: a checkpoint saved at DP 2 (two gloo ranks) is converted to DeepSpeed's universal format by
`convert_to_universal` with 1 and with `--workers` processes. Ratios are taken within one process run.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
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
    out = {"sync_s": [], "async_block_s": [], "async_commit_s": []}
    step = 0
    for _ in range(args.repeats):
        for background in (False, True):  # interleaved, so that both see the same page-cache and disk state
            step += 1
            ckpt = Checkpointer(engine, root, RetentionPolicy(keep_last=1), background=background)
            t0 = time.perf_counter()
            ckpt.save(step, run_state, {}, "{}\n")
            t1 = time.perf_counter()
            ckpt.finish()
            t2 = time.perf_counter()
            if background:
                out["async_block_s"].append(t1 - t0)
                out["async_commit_s"].append(t2 - t0)
            else:
                out["sync_s"].append(t1 - t0)
            assert verify_checkpoint(root / f"step-{step:08d}") is None
    out["checkpoint_mb"] = _bytes(root / f"step-{step:08d}") / 1e6
    out["parameters_m"] = sum(p.numel() for p in engine.module.parameters()) / 1e6
    return out


def _save_dp2(args, root: str):
    from hgrn_megatron.pretrain.checkpoint import RetentionPolicy, save_checkpoint
    from hgrn_megatron.pretrain.distributed import init_model_parallel
    from hgrn_megatron.pretrain.engine import build_engine as build
    from hgrn_megatron.runtime_env import patch_for_cpu

    patch_for_cpu()
    init_model_parallel(1)
    import torch

    cfg = run_config({"hidden_size": args.hidden, "num_layers": args.layers, "ffn_hidden_size": 3 * args.hidden,
                      "num_attention_heads": 8, "seq_length": 64}, micro_batch_size=1)
    cfg.train.global_batch_size = 2
    engine = build(cfg, args.vocab, dp_size=2)
    tokens = torch.randint(0, args.vocab, (1, 65))
    engine.backward(engine(tokens[:, :-1], labels=tokens[:, 1:]).float().mean())
    engine.step()
    save_checkpoint(engine, Path(root), 1, {"vocab_size": args.vocab, "step": 1}, {}, "{}\n",
                    RetentionPolicy(keep_last=1))


def reshard_times(args, root: Path) -> dict:
    from hgrn_megatron.pretrain.checkpoint import DS_UNIVERSAL_TAG
    from hgrn_megatron.pretrain.checkpoint.load import convert_in_subprocess
    from hgrn_megatron.testing.distributed import run_distributed

    run_distributed(_save_dp2, world_size=2, args=(args, str(root)), timeout=1800)
    ckpt = root / "step-00000001"
    out = {"checkpoint_mb": _bytes(ckpt / "ds") / 1e6, "workers": args.workers}
    for workers in (1, args.workers) * args.repeats:  # in a fresh process each, as the trainer runs it
        shutil.rmtree(ckpt / DS_UNIVERSAL_TAG, ignore_errors=True)
        t0 = time.perf_counter()
        convert_in_subprocess(ckpt, workers=workers)
        out.setdefault(f"{workers}_workers_s", []).append(time.perf_counter() - t0)
    return out


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
            r = result["reshard"] = reshard_times(args, base / "reshard")
            one, many = statistics.median(r["1_workers_s"]), statistics.median(r[f"{args.workers}_workers_s"])
            print(f"universal conversion of a {r['checkpoint_mb']:.0f} MB DP-2 checkpoint: 1 worker {one:.2f} s, "
                  f"{args.workers} workers {many:.2f} s ({many / one:.2f} x)")
        s = result["save"] = blocking_times(args, base / "save")
        sync, block = statistics.median(s["sync_s"]), statistics.median(s["async_block_s"])
        print(f"model {s['parameters_m']:.1f} M parameters, checkpoint {s['checkpoint_mb']:.0f} MB")
        print(f"synchronous save: {sync:.3f} s; background save blocks {block:.3f} s "
              f"({100 * block / sync:.1f} % of synchronous), committed after "
              f"{statistics.median(s['async_commit_s']):.3f} s")
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
