"""A reproducible ablation study of HGRN: the full model, its ablations and a parameter-matched Transformer.

    hgrn-data reshard 'DATA/train-*.jsonl.zst' --out FRAMED --frame-mib 0.25
    python benchmarks/ablations.py --train-shards 'FRAMED/*.jsonl.zst' --valid-shards DATA/val.jsonl.zst \
        --tokenizer tests/assets/tokenizer/tokenizer.model --tokens 2000000 --seeds 3 --out runs/ablations

Every variant is trained by the framework's own trainer (`hgrn-pretrain`, one process, fp32) on the same data in
the same order (`data.seed` fixed) with the same schedule; seeds change the initial weights only. Variants
(`VARIANTS`): the full HGRN (document resets on), no lower bound, real instead of complex with the same state
size (expand_ratio 2), no output gate, no document reset, the paper's §3.2 form, and a Transformer baseline whose
MLP is widened until its parameter count matches the full HGRN's (both counts are reported).

Writes into --out: `runs/<variant>-seed<k>/` (each a normal run directory, resumable: a finished run is not
trained again), `results.json`, `results.md` (validation loss and perplexity mean ± std over seeds, overall and
per source, parameter counts, learned lower bound and mean forget gate per layer) and `curves.png`
(`ablation_report.py` computes and draws them).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Model overrides of each variant, on top of the base model (`base_model`); the transformer's MLP width is set
# by `matched_transformer`.
VARIANTS: dict[str, dict] = {
    "full": {},
    "no_lower_bound": {"use_lower_bound": False},
    "real_same_state": {"variant": "real", "expand_ratio": 2},
    "no_output_gate": {"output_gate": False},
    "no_document_reset": {"reset_at_document_boundary": False},
    "paper_form": {"form": "paper"},
    "transformer": {"mixer": "attention"},
}


def base_model(args) -> dict:
    return {"hidden_size": args.hidden, "num_layers": args.layers, "ffn_hidden_size": args.ffn,
            "num_attention_heads": args.heads, "seq_length": args.seq, "variant": "complex",
            "reset_at_document_boundary": True}


def matched_transformer(model: dict, vocab: int) -> tuple[dict, int, int]:
    """The attention model with the MLP width whose parameter count is nearest the full HGRN's:
    (model fields, HGRN parameters, transformer parameters)."""
    from hgrn_megatron.config import ModelConfig
    from hgrn_megatron.flops import count_parameters

    target = count_parameters(ModelConfig.build(model), vocab)
    attention = {**model, "mixer": "attention"}
    count = lambda ffn: count_parameters(ModelConfig.build({**attention, "ffn_hidden_size": ffn}), vocab)  # noqa: E731
    per_unit = count(model["ffn_hidden_size"] + 1) - count(model["ffn_hidden_size"])
    guess = max(1, model["ffn_hidden_size"] + round((target - count(model["ffn_hidden_size"])) / per_unit))
    best = min(range(max(1, guess - 2), guess + 3), key=lambda f: abs(count(f) - target))
    return {**attention, "ffn_hidden_size": best}, target, count(best)


def run_tree(args, name: str, model: dict, seed: int, run_dir: Path) -> dict:
    steps = max(1, args.tokens // (args.batch * args.seq))
    return {
        "run_dir": str(run_dir),
        "model": model,
        "data": {"train_shards": args.train_shards, "valid_shards": args.valid_shards, "num_workers": 0,
                 "seed": args.data_seed, "valid_samples": args.valid_samples, "lanes": args.lanes},
        "tokenizer": {"model": args.tokenizer},
        "train": {"steps": steps, "global_batch_size": args.batch, "micro_batch_size": args.batch,
                  "precision": "fp32", "seed": 1000 + seed, "eval_interval": max(1, steps // args.curve_points)},
        "optimizer": {"lr": args.lr, "min_lr": args.lr / 10},
        "schedule": {"warmup_steps": max(1, steps // 20), "decay_style": "cosine"},
        "parallel": {"zero_stage": 0},
        "checkpoint": {"interval": 0, "keep_last": 1},
        "logging": {"log_interval": max(1, steps // (4 * args.curve_points)), "tensorboard": False},
    }


def finished(run_dir: Path, steps: int) -> bool:
    """True when the run's metrics hold the validation at its last step (and a final checkpoint exists)."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists() or not (run_dir / "checkpoints").is_dir():
        return False
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return any(r.get("split") == "val" and r.get("step") == steps for r in records)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def train_one(tree: dict, log) -> None:
    """One run through the framework's CLI in a fresh process; raises when it fails."""
    run_dir = Path(tree["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "ablation_config.yaml"
    write_atomically(config, yaml.safe_dump(tree, sort_keys=False))
    with open(run_dir / "train.log", "a") as out:
        proc = subprocess.run([sys.executable, "-m", "hgrn_megatron.pretrain", "--config", str(config)],
                              stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{run_dir.name}: training exited with {proc.returncode} (see {run_dir / 'train.log'})")
    log(f"{run_dir.name}: done")


def plan_runs(args, vocab: int) -> tuple[list[tuple[str, int, dict]], dict]:
    """(variant, seed, run tree) for every run, and the parameter counts."""
    from hgrn_megatron.config import ModelConfig
    from hgrn_megatron.flops import count_parameters

    base = base_model(args)
    transformer, hgrn_params, transformer_params = matched_transformer(base, vocab)
    runs, params = [], {}
    for name in args.variants:
        model = transformer if name == "transformer" else {**base, **VARIANTS[name]}
        params[name] = count_parameters(ModelConfig.build(model), vocab)
        seeds = args.seeds_per.get(name, args.seeds)
        for seed in range(seeds):
            runs.append((name, seed, run_tree(args, name, model, seed, args.out / "runs" / f"{name}-seed{seed}")))
    params["_matched"] = {"hgrn": hgrn_params, "transformer": transformer_params}
    return runs, params


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-shards", nargs="+", required=True)
    p.add_argument("--valid-shards", nargs="+", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokens", type=int, required=True, help="training tokens per run")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant")
    p.add_argument("--seeds-per", nargs="*", default=[], metavar="VARIANT=N", help="seeds for single variants")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--data-seed", type=int, default=1234)
    p.add_argument("--lanes", type=int, default=64,
                   help="packing lanes: at least --batch, and at most the shards' units (frames) so that no two "
                        "lanes share one; reshard plain shards into frames first (`hgrn-data reshard`)")
    p.add_argument("--valid-samples", type=int, default=64)
    p.add_argument("--curve-points", type=int, default=10, help="validation passes per run")
    p.add_argument("--probe-samples", type=int, default=8, help="validation samples for the forget-gate probe")
    args = p.parse_args(argv)
    try:
        args.seeds_per = {k: int(v) for k, v in (item.split("=", 1) for item in args.seeds_per)}
    except ValueError:
        p.error("--seeds-per: expected VARIANT=N pairs")
    unknown = set(args.seeds_per) - set(VARIANTS)
    if unknown:
        p.error(f"--seeds-per: unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    return args


def main(argv=None) -> int:
    from ablation_report import report

    from hgrn_megatron.tokenizer import Tokenizer, padded_vocab_size

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    vocab = padded_vocab_size(Tokenizer.load(args.tokenizer).vocab_size, 1)
    runs, params = plan_runs(args, vocab)
    for name, seed, tree in runs:
        if finished(Path(tree["run_dir"]), tree["train"]["steps"]):
            print(f"{name}-seed{seed}: already trained", flush=True)
            continue
        print(f"{name}-seed{seed}: training {tree['train']['steps']} steps", flush=True)
        train_one(tree, lambda msg: print(msg, flush=True))
    results = report(args, runs, params)
    print((args.out / "results.md").read_text())
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
