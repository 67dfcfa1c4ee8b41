"""What the data pipeline costs at cluster scale, old design against new, scaled from a small real run's counters.

    python benchmarks/data_scaling.py [--shards '../pile-sample/0*.jsonl.zst'] [--tokenizer DIR] [--frame-mib 1]

The small run: the shards are resharded into frames (`--frame-mib`), then a `TrainLoader` (DP 1, 1 worker,
16 lanes, sequence 2048) consumes about half a pass, saves its state, and a second loader resumes from it. Its
counters give the text bytes per token, the compression ratio, the loader's CPU seconds per token and the text
decompressed to reach the saved positions per lane. These are scaled to the real Pile (`--corpus-text-tb`
of text) and the job's token rate (45 % MFU on H100: 68.5 k tokens/s per GPU for hgrn-1b, 11 k for hgrn-7b;
TP 1 and 2 as in configs/hgrn-1b.yaml and hgrn-7b.yaml; `--workers` loader processes per loading rank).

Old design: every TP rank loads, and each worker decompresses every shard (records dealt to lanes one by one);
a resume decompresses each worker's shard from byte 0 to the saved line (half a shard on average). New design:
one loader per TP group (`GroupLoader`), lanes own units (a worker decompresses its share), a resume
decompresses at most one frame per lane.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {"1b": {"tokens_per_gpu_s": 68.5e3, "tp": 1}, "7b": {"tokens_per_gpu_s": 11e3, "tp": 2}}
PILE_SHARDS = 30
LINE_SCAN_BYTES_PER_CORE_S = 0.35e9  # zstd decompress + line split of Pile text per core (0.29-0.46 GB/s measured)


def small_run(shards: str, tokenizer_dir: str, frame_mib: float, seq_length: int = 2048) -> dict:
    from hgrn_megatron.corpus.reshard import reshard_one
    from hgrn_megatron.corpus.shards import resolve_shards
    from hgrn_megatron.pretrain.data import DataConfig, TrainLoader, merge_data_states
    from hgrn_megatron.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    with tempfile.TemporaryDirectory() as tmp:
        text = compressed = 0
        for path in resolve_shards([shards], field="--shards"):
            result = reshard_one(path, Path(tmp) / path.name, frame_bytes=int(frame_mib * (1 << 20)))
            text += result.text_bytes
            compressed += result.output_bytes
        lanes, mb = 16, 4
        cfg = DataConfig.build({"train_shards": [str(Path(tmp) / "*.jsonl.zst")], "lanes": lanes, "num_workers": 1})
        steps = max(2, int(0.5 * text / 4.0 / (seq_length * mb)))  # about half a pass at ~4 bytes per token
        with TrainLoader(cfg, tokenizer, seq_length, mb, 0, 1) as loader:
            for _ in range(steps):
                next(loader)
            stats = loader.stats()
            state = merge_data_states([loader.state_dict()])
        with TrainLoader(cfg, tokenizer, seq_length, mb, 0, 1, state=state) as resumed:
            next(resumed)
            seek = resumed.stats()["seek_decompressed_bytes"]
    tokens = stats["sample_tokens"]
    return {"corpus_text_bytes": text, "compression": text / compressed, "text_bytes_per_token":
            stats["decompressed_bytes"] / tokens, "read_over_decompressed": stats["read_bytes"] / stats[
            "decompressed_bytes"], "cpu_s_per_token": stats["loader_cpu_s"] / tokens, "seek_bytes_per_lane":
            seek / lanes, "frame_text_bytes": frame_mib * (1 << 20), "tokens": tokens}


def scale(run: dict, gpus: int, model: str, corpus_text: float, workers: int, lanes: int, frame: float) -> dict:
    m = MODELS[model]
    tp = m["tp"]
    dp = gpus // tp
    job_tokens_s = gpus * m["tokens_per_gpu_s"]
    job_text_s = job_tokens_s * run["text_bytes_per_token"]
    corpus_compressed = corpus_text / run["compression"]
    shard_compressed = corpus_compressed / PILE_SHARDS  # the Pile as shipped: one frame per shard
    replica_tokens_s = job_tokens_s / dp
    tokenize_cores = replica_tokens_s * run["cpu_s_per_token"] / workers  # per worker, new design
    old_workers, new_workers = gpus * workers, dp * workers
    return {
        "gpus": gpus, "model": model, "tp": tp, "dp": dp,
        "old_worker_cores": tokenize_cores + job_text_s / LINE_SCAN_BYTES_PER_CORE_S,
        "new_worker_cores": tokenize_cores,
        "old_worker_text_bytes_per_pass": corpus_text,
        "new_worker_text_bytes_per_pass": corpus_text / new_workers,
        "old_fs_bytes_per_pass": old_workers * corpus_compressed,
        "new_fs_bytes_per_pass": corpus_text * run["read_over_decompressed"],
        "old_resume_fs_bytes": old_workers * shard_compressed / 2,
        "new_resume_fs_bytes": lanes * frame / run["compression"],
    }


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} EB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default=str(ROOT / "tests/assets/pile-mini/train-*.jsonl.zst"))
    ap.add_argument("--tokenizer", default=str(ROOT / "tests/assets/tokenizer"))
    ap.add_argument("--frame-mib", type=float, default=0.25, help="frames of the small run")
    ap.add_argument("--corpus-text-tb", type=float, default=0.825, help="text of the real corpus (the Pile: 0.825)")
    ap.add_argument("--real-frame-mib", type=float, default=4.0, help="frames of the real corpus")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--lanes", type=int, default=4096)
    ap.add_argument("--json", help="write the small run and the table here")
    args = ap.parse_args(argv)
    run = small_run(args.shards, args.tokenizer, args.frame_mib)
    print("small run:", json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in run.items()}))
    print(f"seek per lane on resume: {human(run['seek_bytes_per_lane'])} of text (frames of "
          f"{human(run['frame_text_bytes'])})")
    rows = [scale(run, g, m, args.corpus_text_tb * 1e12, args.workers, args.lanes, args.real_frame_mib * (1 << 20))
            for g in (64, 512, 2048) for m in ("1b", "7b")]
    print(f"\n{'GPUs':>5} {'model':>5} {'DP':>5} | {'worker cores old/new':>21} | {'worker text/pass old/new':>25} | "
          f"{'FS bytes/pass old/new':>23} | {'resume FS reads old/new':>24}")
    for r in rows:
        print(f"{r['gpus']:>5} {r['model']:>5} {r['dp']:>5} | {r['old_worker_cores']:>9.2f} / {r['new_worker_cores']:<9.3f} | "
              f"{human(r['old_worker_text_bytes_per_pass']):>11} / {human(r['new_worker_text_bytes_per_pass']):<11} | "
              f"{human(r['old_fs_bytes_per_pass']):>10} / {human(r['new_fs_bytes_per_pass']):<10} | "
              f"{human(r['old_resume_fs_bytes']):>10} / {human(r['new_resume_fs_bytes']):<10}")
    if args.json:
        Path(args.json).write_text(json.dumps({"run": run, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
