"""DeepSpeed's universal checkpoint (`ds_to_universal`'s output, world-size independent), with every step that
reads or writes parameter data spread over a pool of worker processes.

DeepSpeed's converter runs two steps in its worker pools (extracting each ZeRO shard's fragments, merging each
parameter) and the rest in the calling process: loading every model-state file for parameters without
optimizer state, loading a whole ZeRO shard again for the optimizer's common state, copying the model-state
files, removing the fragments. With 2 workers those serial steps and the idle time between the pools kept the
conversion of a 400 MB checkpoint at 0.86 x of 1 worker. Here (ZeRO 1-2 without pipeline stages or experts,
this project's layouts) the same DeepSpeed functions do the work, scheduled so that no step waits alone:
  1. every ZeRO shard's fragments extracted (`extract_zero_shards`), one task each;
  2. one pool pass over: each parameter merged across its TP and DP pieces (`merge_tp_slices`, its fragments
     removed right after), the model-state files written to the output without megatron's `_extra_state` entries
     (None, which the converter cannot write), and the optimizer's common state; largest tasks first.
The output is the files DeepSpeed's `ds_to_universal` writes for the same input (tested file by file); other
layouts go through DeepSpeed's converter itself.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

# The conversion's inputs, set before the worker processes fork (they inherit it; nothing large is pickled).
_job: dict = {}


def convert(source: Path, output: Path, workers: int) -> None:
    """Write the universal checkpoint of DeepSpeed tag folder `source` into `output` (which must not exist)."""
    from deepspeed.checkpoint import DeepSpeedCheckpoint
    from deepspeed.checkpoint import ds_to_universal as dsu
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    ds = DeepSpeedCheckpoint(str(source))
    dsu._inject_missing_state(ds)
    dsu._check_for_required_state(ds)
    by_tp, autoep, _ = dsu._aggregate_autoep_zero12_metadata(ds.model_state_metadata)
    if _zero_stage(source) not in (1, 2) or autoep or ds.pp_degree != 1 or list(source.glob("layer_*")):
        return _deepspeed_converter(source, output, workers)
    shapes = dsu._group_per_tp_shapes(by_tp, ds.pp_degree, ds.tp_degree)
    _job.update(ds=ds, dsu=dsu, output=str(output), temp=str(output / "tmp"), shapes=shapes,
                info=ds.get_checkpoint_info(UNIVERSAL_CHECKPOINT_INFO))
    output.mkdir(parents=True)
    # fork: the workers inherit `_job`; one torch thread each, as the pool is sized to the node's cores
    pool = (ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=torch.set_num_threads,
                                initargs=(1,)) if workers > 1 else None)
    try:
        _run(pool, _extract, list(itertools.product(range(ds.pp_degree), range(ds.tp_degree), range(ds.dp_degree))))
        largest_first = sorted(shapes, key=lambda n: -max(math.prod(s or ()) for s in shapes[n]))
        tasks = [("model", f) for f in ds.mp_rank_files] + [("merge", n) for n in largest_first] + [("optim", "")]
        results = _run(pool, _second_pass, tasks)
    finally:
        if pool is not None:
            pool.shutdown()
        _job.clear()
    unmatched = [found for kind, found in results if kind == "merge"]
    leftover = set.intersection(*unmatched) if unmatched else set()
    if leftover:
        raise ValueError(f"universal conversion: unused parameter patterns {sorted(leftover)}")
    for model_file, names in ((found[0], found[1]) for kind, found in results if kind == "model"):
        if any(not (output / "zero" / n / "fp32.pt").is_file() for n in names):
            _fp32_for_parameters_without_optimizer_state(output, model_file)
    shutil.rmtree(output / "tmp", ignore_errors=True)


def _zero_stage(source: Path) -> int | None:
    """The ZeRO stage the shards in `source` were saved at (their files mapped, not read)."""
    shards = sorted(source.glob("*zero_pp_rank_*_optim_states.pt"))
    if not shards:
        return None
    state = torch.load(shards[0], map_location="cpu", weights_only=False, mmap=True)
    return int(state["optimizer_state_dict"].get("zero_stage", 1))


def _run(pool, fn, tasks: list) -> list:
    """`fn` over `tasks`, in the pool (results in task order) or, without one, here."""
    if pool is None:
        return [fn(t) for t in tasks]
    return list(pool.map(fn, tasks))


def _extract(indices) -> None:
    _job["dsu"].extract_zero_shards(_job["temp"], _job["ds"], indices)


def _second_pass(task):
    kind, what = task
    if kind == "merge":
        unmatched = _job["dsu"].merge_tp_slices(_job["info"], os.path.join(_job["output"], "zero"), _job["temp"],
                                                _job["ds"].tp_degree, (what, _job["shapes"][what]))
        shutil.rmtree(os.path.join(_job["temp"], what), ignore_errors=True)  # its fragments, no longer needed
        return kind, set(unmatched)
    if kind == "model":
        state = torch.load(what, map_location="cpu", weights_only=False)
        if isinstance(state.get("module"), dict):
            state["module"] = {k: v for k, v in state["module"].items() if v is not None}
        target = os.path.join(_job["output"], os.path.basename(what))
        torch.save(state, target)
        return kind, (target, list(state.get("module") or ()))
    _job["dsu"]._save_optimizer_state(argparse.Namespace(output_folder=_job["output"]), _job["ds"])
    return kind, None


def _fp32_for_parameters_without_optimizer_state(output: Path, model_file: str) -> None:
    """What DeepSpeed's converter does for a parameter that never had a gradient (no ZeRO fragment, so no merged
    `fp32.pt`): its model value as the fp32 master."""
    from deepspeed.checkpoint.constants import PARAM

    module = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
    for name, tensor in module.items():
        target = output / "zero" / name / "fp32.pt"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.save({PARAM: tensor.float()}, target)


def _deepspeed_converter(source: Path, output: Path, workers: int) -> None:
    """DeepSpeed's `ds_to_universal` itself, on a view of `source` whose model-state files drop megatron's
    `_extra_state` entries (the ZeRO shards are symlinked)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    view = source.with_name(source.name + ".universal-input")
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir()
    try:
        for path in source.iterdir():
            if path.name.endswith("model_states.pt"):
                state = torch.load(path, map_location="cpu", weights_only=False)
                if isinstance(state.get("module"), dict):
                    state["module"] = {k: v for k, v in state["module"].items() if v is not None}
                torch.save(state, view / path.name)
            else:
                os.symlink(path.resolve(), view / path.name)
        ds_to_universal(argparse.Namespace(
            input_folder=str(view), output_folder=str(output), num_extract_workers=workers,
            num_merge_workers=workers, keep_temp_folder=False, strict=True, inject_missing_state=True))
    finally:
        shutil.rmtree(view, ignore_errors=True)
        (output.parent / "latest_universal").unlink(missing_ok=True)  # DeepSpeed's pointer at `output`'s name
