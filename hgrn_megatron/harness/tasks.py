"""Run lm-evaluation-harness tasks on a model or scorer, and save its results.

    results = run_tasks(model, tokenizer, ["tiny_qa"], task_dir="tests/assets/eval", limit=8)
    write_results(results, Path("runs/x/eval/step-00000300.json"))
"""
from __future__ import annotations

import contextlib
import json
import os
import random
from pathlib import Path

INSTALL_HINT = ("lm-evaluation-harness is not installed: pip install 'hgrn-megatron[eval]' "
                "(or pip install -c constraints.txt lm-eval)")


def harness_available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def run_tasks(model, tokenizer, tasks: list[str], *, task_dir: str | Path | None = None,
              limit: int | None = None, batch_size: int = 16, reuse_prefix: bool = True,
              num_fewshot: int | None = None, log_samples: bool = False, where: str = "--tasks",
              manager=None) -> dict:
    """The harness's results dict (samples dropped unless `log_samples`), plus `hgrn_throughput`: the
    loglikelihood requests scored, their seconds and requests per second. `model`: a `StatefulLM` or a scorer
    (`harness.lm.HGRNHarnessLM`). The random generators the harness seeds are restored afterwards, so a run
    inside training leaves the training's random streams where they were. `manager`: a TaskManager from
    `find_tasks` to reuse (indexing the harness's own tasks takes ~20 s)."""
    import lm_eval

    from .lm import HGRNHarnessLM

    lm = HGRNHarnessLM(model, tokenizer, batch_size=batch_size, reuse_prefix=reuse_prefix)
    manager = manager or find_tasks(tasks, task_dir, where)
    with preserved_rng():
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager,
                                          num_fewshot=num_fewshot, log_samples=log_samples, bootstrap_iters=1000)
    seconds = lm.stats["seconds"]
    results["hgrn_throughput"] = {
        "loglikelihood_requests": lm.stats["requests"], "seconds": round(seconds, 3),
        "requests_per_s": round(lm.stats["requests"] / seconds, 2) if seconds > 0 else None,
        "batch_size": lm.scorer.batch_size, "reuse_prefix": lm.scorer.reuses_prefix,
    }
    return results


def find_tasks(tasks: list[str], task_dir: str | Path | None, where: str = "--tasks"):
    """The harness's TaskManager that holds every one of `tasks`; KeyError naming `where` and the unknown ones."""
    manager = _task_manager(tasks, task_dir)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hint = f" (looked in {task_dir} and the harness's tasks)" if task_dir else " (local tasks need a task folder)"
        raise KeyError(f"{where}: unknown task(s) {', '.join(unknown)}{hint}")
    return manager


@contextlib.contextmanager
def preserved_rng():
    """Python's, numpy's and torch's (CPU and CUDA) random states restored on exit."""
    import numpy as np
    import torch

    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


def _task_manager(tasks: list[str], task_dir: str | Path | None):
    """Only `task_dir`'s tasks when it holds every one asked for: indexing the harness's own ~15,000 task
    configs takes about 20 s on a small CPU."""
    from lm_eval.tasks import TaskManager

    if task_dir:
        local = TaskManager(include_path=str(task_dir), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=str(task_dir) if task_dir else None)


# Sections of the harness's results keyed by task or group name: a later run at the same step adds its tasks
# to an existing file (and replaces a task evaluated again) instead of dropping the earlier ones.
PER_TASK_SECTIONS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better",
                     "n-samples")


def merge_results(earlier: dict, results: dict) -> dict:
    merged = dict(results)
    for key in PER_TASK_SECTIONS:
        if isinstance(earlier.get(key), dict) or isinstance(results.get(key), dict):
            merged[key] = {**(earlier.get(key) or {}), **(results.get(key) or {})}
    return merged


def write_results(results: dict, path: Path, merge: bool = False) -> None:
    """JSON (numpy scalars and other non-JSON values made plain), written as PATH.tmp-PID and renamed. With
    `merge`, the tasks of an existing file at `path` that `results` does not hold are kept."""
    from lm_eval.utils import handle_non_serializable

    if merge and path.is_file():
        try:
            results = merge_results(json.loads(path.read_text()), results)
        except ValueError:
            pass  # not our JSON (or damaged): replaced whole
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    os.replace(tmp, path)


def results_table(results: dict) -> str:
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table
