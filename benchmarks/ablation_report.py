"""The tables, curves and gate probe of `ablations.py`, from the finished run directories.

- validation loss and perplexity at the last step, mean ± sample std over seeds, overall and per source;
- learning curves (validation loss against tokens, mean over seeds) as a PNG;
- per layer: the learned lower bound γ_k (mean over channels, from the final checkpoint's table) and the mean
  forget gate λ over the probe's validation tokens (native model, forward hooks on W_f) — the paper's claim is
  that both rise with depth.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train records, validation records) of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("split") == "train"], [r for r in records if r.get("split") == "val"]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def probe_gates(tree: dict, samples: int) -> dict | None:
    """Per layer: mean γ over channels and the mean forget gate λ over validation tokens (None: no HGRU)."""
    import torch

    from hgrn_megatron.config import ModelConfig
    from hgrn_megatron.export.checkpoint_reader import read_checkpoint
    from hgrn_megatron.model import build_model, lower_bounds_from_table, single_process_model_parallel
    from hgrn_megatron.pretrain.config import RunConfig
    from hgrn_megatron.pretrain.data import build_validation_batches
    from hgrn_megatron.tokenizer import Tokenizer, padded_vocab_size

    cfg = RunConfig.build(tree)
    if cfg.model.mixer != "hgrn":
        return None
    ckpt = read_checkpoint(tree["run_dir"])
    tok = Tokenizer.load(cfg.tokenizer.model)
    data = cfg.data.model_copy(update={"valid_samples": samples})
    batches = build_validation_batches(data, tok, cfg.model.seq_length, samples)["batches"]
    with single_process_model_parallel():
        model = build_model(ModelConfig.build(tree["model"]), padded_vocab_size(tok.vocab_size, 1)).eval()
        missing, unexpected = model.load_state_dict(ckpt.state_dict, strict=False)
        if [k for k in missing + unexpected if not k.endswith("_extra_state")]:
            raise RuntimeError(f"{tree['run_dir']}: checkpoint does not fit the model ({missing}, {unexpected})")
        layers = model.decoder.layers
        gamma = (lower_bounds_from_table(model.lower_bounds.table.detach()) if model.lower_bounds is not None
                 else torch.zeros(len(layers), 1))
        sums = [0.0] * len(layers)
        counts = [0] * len(layers)

        def hook(k):
            def record(module, inputs, output):
                lam = gamma[k] + (1 - gamma[k]) * torch.sigmoid(output[0].float())
                sums[k] += float(lam.sum())
                counts[k] += lam.numel()
            return record

        handles = [layer.self_attention.linear_forget.register_forward_hook(hook(k)) for k, layer in enumerate(layers)]
        with torch.no_grad():
            for batch in batches:
                model(batch["tokens"][:, :-1], doc_start=batch["doc_start"][:, :-1])
        for h in handles:
            h.remove()
    return {"lower_bound": [float(g.mean()) for g in gamma],
            "forget_gate": [s / max(c, 1) for s, c in zip(sums, counts)]}


def summarise(args, runs, params) -> dict:
    """Everything results.json holds."""
    per_variant: dict[str, dict] = {}
    for name, seed, tree in runs:
        run_dir = Path(tree["run_dir"])
        train, val = read_metrics(run_dir)
        entry = per_variant.setdefault(name, {"runs": [], "parameters": params[name]})
        tokens_per_step = tree["train"]["global_batch_size"] * tree["model"]["seq_length"]
        entry["runs"].append({
            "seed": seed, "final": val[-1],
            "val_curve": [(r["step"] * tokens_per_step, r["val_loss"]) for r in val],
            "train_curve": [(r["step"] * tokens_per_step, r["loss"]) for r in train],
            "gates": probe_gates(tree, args.probe_samples),
        })
    for entry in per_variant.values():
        finals = [r["final"] for r in entry["runs"]]
        entry["val_loss"] = mean_std([f["val_loss"] for f in finals])
        entry["val_ppl"] = mean_std([math.exp(f["val_loss"]) for f in finals])
        sources = sorted({k.split("/", 1)[1] for f in finals for k in f if k.startswith("val_loss/")})
        entry["per_source"] = {s: mean_std([f[f"val_loss/{s}"] for f in finals if f"val_loss/{s}" in f])
                               for s in sources}
        gates = [r["gates"] for r in entry["runs"] if r["gates"]]
        if gates:
            entry["lower_bound"] = [statistics.fmean(col) for col in zip(*(g["lower_bound"] for g in gates))]
            entry["forget_gate"] = [statistics.fmean(col) for col in zip(*(g["forget_gate"] for g in gates))]
    return {"variants": per_variant, "matched_parameters": params["_matched"],
            "tokens_per_run": runs[0][2]["train"]["steps"] * args.batch * args.seq if runs else 0}


def markdown(results: dict) -> str:
    rows = ["| variant | parameters | seeds | val loss | val ppl |", "|---|---:|---:|---|---|"]
    sources: set[str] = set()
    for name, e in results["variants"].items():
        (loss, loss_sd), (ppl, ppl_sd) = e["val_loss"], e["val_ppl"]
        rows.append(f"| {name} | {e['parameters']:,} | {len(e['runs'])} | {loss:.4f} ± {loss_sd:.4f} "
                    f"| {ppl:.2f} ± {ppl_sd:.2f} |")
        sources |= set(e["per_source"])
    out = ["## Validation at the last step (mean ± sample std over seeds)", "", *rows, ""]
    if sources:
        names = sorted(sources)
        out += ["## Validation loss per source", "", "| variant | " + " | ".join(names) + " |",
                "|---|" + "---|" * len(names)]
        for name, e in results["variants"].items():
            cells = [f"{e['per_source'][s][0]:.4f} ± {e['per_source'][s][1]:.4f}" if s in e["per_source"] else "—"
                     for s in names]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["## Per layer: learned lower bound γ (mean over channels) / mean forget gate λ", "",
            "| variant | " + " | ".join(f"layer {k}" for k in range(_layers(results))) + " |",
            "|---|" + "---|" * _layers(results)]
    for name, e in results["variants"].items():
        if "lower_bound" in e:
            cells = [f"{g:.3f} / {f:.3f}" for g, f in zip(e["lower_bound"], e["forget_gate"])]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    m = results["matched_parameters"]
    out += ["", f"Transformer baseline matched to the full HGRN: {m['transformer']:,} against {m['hgrn']:,} "
            f"parameters; {results['tokens_per_run']:,} training tokens per run."]
    return "\n".join(out) + "\n"


def _layers(results: dict) -> int:
    return max((len(e.get("lower_bound", [])) for e in results["variants"].values()), default=0)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, e in results["variants"].items():
        curves = [r["val_curve"] for r in e["runs"]]
        length = min(len(c) for c in curves)
        xs = [curves[0][i][0] for i in range(length)]
        ys = [statistics.fmean(c[i][1] for c in curves) for i in range(length)]
        ax.plot(xs, ys, marker="o", markersize=3, label=f"{name} (n={len(curves)})")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (mean over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def report(args, runs, params) -> dict:
    results = summarise(args, runs, params)
    out = Path(args.out)
    for name, text in (("results.json", json.dumps(results, indent=1)), ("results.md", markdown(results))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)
    plot(results, out / "curves.png")
    return results
