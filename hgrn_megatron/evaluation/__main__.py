"""`hgrn-eval`: lm-evaluation-harness tasks, or loss/perplexity on Pile-format shards, for a checkpoint.

    hgrn-eval --checkpoint RUN_OR_STEP_DIR | --hf DIR  --tasks T1,T2 [--limit N] [--batch-size N]
              [--task-dir DIR] [--num-fewshot K] [--no-prefix-reuse] [--log-samples] [--out FILE]
    hgrn-eval --checkpoint RUN_OR_STEP_DIR --shards GLOB [GLOB ...] [--samples N] [--batch-size N] [--out FILE]

Harness results go to RUN_DIR/eval/step-NNNNNNNN.json (from a checkpoint) and/or --out, and a table to stdout.
Exit codes: 0 done; 2 bad input or lm-eval not installed (one line on stderr).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hgrn-eval", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a run directory (its newest complete checkpoint) or a step folder")
    source.add_argument("--hf", help="an exported Hugging Face directory (hgrn-export-hf)")
    work = p.add_mutually_exclusive_group(required=True)
    work.add_argument("--tasks", help="comma-separated lm-evaluation-harness task or group names")
    work.add_argument("--shards", nargs="+", help="Pile-format shards (globs): loss and perplexity per source")
    p.add_argument("--limit", type=int, default=None, help="at most N documents per task")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per forward (default: 16 for tasks; the run's micro_batch_size for --shards)")
    p.add_argument("--task-dir", default=None, help="folder of extra task YAMLs (local data for offline use)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="score every request as one whole sequence instead of carrying its context's state")
    p.add_argument("--log-samples", action="store_true",
                   help="keep the harness's per-request records (arguments, log-likelihoods) in the results")
    p.add_argument("--samples", type=int, default=None,
                   help="--shards: samples of seq_length + 1 tokens (default: the run's data.valid_samples)")
    p.add_argument("--tokenizer", default=None, help="--shards: SentencePiece model if not where the run says")
    p.add_argument("--device", default="auto", help="tasks: auto (a GPU when there is one), cpu, cuda, cuda:N")
    p.add_argument("--out", default=None, help="also write the results as JSON to this file")
    return p


def _check_args(p: argparse.ArgumentParser, args) -> None:
    if args.shards and args.hf:
        p.error("--shards needs --checkpoint (the native model reads the training checkpoint)")
    for name in ("limit", "batch_size", "samples"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.task_dir and not Path(args.task_dir).is_dir():
        p.error(f"--task-dir {args.task_dir}: no such directory")
    from .hf_model import EvaluationError, resolve_device

    try:
        resolve_device(args.device)
    except EvaluationError as err:
        p.error(str(err))


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    _check_args(p, args)

    from hgrn_megatron.runtime_env import configure_environment

    configure_environment()  # before deepspeed (ZeRO consolidation) or megatron is imported
    from .hf_model import EvaluationError

    try:
        if args.shards:
            return _run_shards(args)
        return _run_harness(args)
    except (EvaluationError, KeyError) as err:
        message = err.args[0] if err.args else err
        print(f"hgrn-eval: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _run_shards(args) -> int:
    from .perplexity import shard_loss

    out = shard_loss(args.checkpoint, args.shards, samples=args.samples, micro_batch_size=args.batch_size,
                     tokenizer=args.tokenizer)
    print(f"step {out['step']}: {out['samples']} samples, {out['val_tokens']} tokens")
    print(f"{'source':<32} {'loss':>9} {'ppl':>11}")
    print(f"{'(all)':<32} {out['val_loss']:>9.4f} {out['val_ppl']:>11.3f}")
    for key in sorted(k for k in out if k.startswith("val_loss/")):
        name = key.split("/", 1)[1]
        print(f"{name:<32} {out[key]:>9.4f} {out['val_ppl/' + name]:>11.3f}")
    if args.out:
        _write_json(out, Path(args.out))
    return 0


def _run_harness(args) -> int:
    from hgrn_megatron.harness.tasks import INSTALL_HINT, harness_available

    if not harness_available():
        print(f"hgrn-eval: error: {INSTALL_HINT}", file=sys.stderr)
        return EXIT_BAD_INPUT
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        print("hgrn-eval: error: --tasks: give at least one task name", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.hf:
        results = _evaluate_dir(args, Path(args.hf), tasks)
        targets = []
    else:
        from hgrn_megatron.export.checkpoint_reader import ExportError, resolve_step_dir

        from .hf_model import EvaluationError, export_to_temporary

        try:
            step_dir = resolve_step_dir(args.checkpoint)
        except ExportError as err:
            raise EvaluationError(str(err)) from None
        with export_to_temporary(step_dir) as hf_dir:
            results = _evaluate_dir(args, hf_dir, tasks)
        step = json.loads((step_dir / "run_state.json").read_text())["step"]
        results["hgrn_checkpoint"] = {"step_dir": str(step_dir), "step": step}
        targets = [step_dir.parent.parent / "eval" / f"{step_dir.name}.json"]
    from hgrn_megatron.harness.tasks import results_table, write_results

    for path in targets:  # the run's record for this step: tasks evaluated earlier at this step stay
        write_results(results, path, merge=True)
        print(f"wrote {path}", file=sys.stderr)
    if args.out:
        path = Path(args.out)
        write_results(results, path)
        print(f"wrote {path}", file=sys.stderr)
    print(results_table(results))
    t = results["hgrn_throughput"]
    print(f"{t['loglikelihood_requests']} loglikelihood requests in {t['seconds']:.1f} s "
          f"({t['requests_per_s']} requests/s)")
    return 0


def _evaluate_dir(args, hf_dir: Path, tasks: list[str]) -> dict:
    from hgrn_megatron.harness.tasks import run_tasks

    from .hf_model import load_hf_dir, stateful_hf_model

    model, tokenizer = load_hf_dir(hf_dir, device=args.device)
    return run_tasks(stateful_hf_model(model), tokenizer, tasks, task_dir=args.task_dir, limit=args.limit,
                     batch_size=args.batch_size or 16, reuse_prefix=not args.no_prefix_reuse,
                     num_fewshot=args.num_fewshot, log_samples=args.log_samples)


def _write_json(data: dict, path: Path) -> None:
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
