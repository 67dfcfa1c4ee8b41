"""lm-evaluation-harness tasks on the live model inside the training loop (`eval.harness_tasks`).

    harness = HarnessEval(trainer)      # collective, at set-up: rank 0 checks that every task exists
    harness.maybe_run()                 # collective, after each step: at the due steps, evaluate and log

When: every `eval.harness_interval` steps, or (None) at the steps `checkpoint.interval` saves, and always at
the last step; so an in-loop result sits next to a checkpoint whose `hgrn-eval --checkpoint` reproduces it.
How: rank 0 runs the harness (tasks, requests, metrics); every data-parallel replica scores its share of the
requests on the live model (`harness.split`), the tensor-parallel ranks of a replica together
(`harness.native`: logits gathered over TP). Requests are scored as whole sequences (the native forward hands
no recurrent state out). Results: `RUN_DIR/eval/step-N.json` (as `hgrn-eval` writes it; tasks merged) and one
metrics record `{"split": "eval", "eval/<task>/<metric>": ...}` (metrics.jsonl, TensorBoard, W&B).
"""
from __future__ import annotations

import logging
import math
import time

import torch.distributed as dist

from hgrn_megatron.config_base import ConfigError
from hgrn_megatron.harness.native import native_lm
from hgrn_megatron.harness.scorer import LocalScorer
from hgrn_megatron.harness.split import LEADER, ReplicaLayout, SplitScorer

from .distributed import comm_device

log = logging.getLogger("hgrn_megatron.pretrain")


def harness_due(step: int, last_step: int, interval: int | None, checkpoint_interval: int) -> bool:
    """Whether the harness runs after `step` (see the module's docstring)."""
    every = interval if interval is not None else checkpoint_interval
    return step == last_step or (bool(every) and step % every == 0)


def metric_record(results: dict, step: int) -> dict:
    """`{"split": "eval", "step", "eval/<task>/<metric>": value}` of every numeric harness metric; a metric with a
    filter other than `none` is named `<metric>_<filter>`."""
    record = {"split": "eval", "step": step}
    for task, metrics in (results.get("results") or {}).items():
        for key, value in metrics.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # alias, sample counts as text, "N/A" stderr
            metric, filt = key.split(",", 1)
            if math.isfinite(value):
                record[f"eval/{task}/{metric if filt == 'none' else f'{metric}_{filt}'}"] = float(value)
    return record


class HarnessEval:
    """The trainer's in-loop harness evaluation (`trainer`: a set-up `Trainer`, read at each run)."""

    def __init__(self, trainer):
        self.trainer, self.cfg = trainer, trainer.cfg.eval
        problem, self.task_manager = [None], None
        if trainer.rank == LEADER:
            from hgrn_megatron.harness.tasks import find_tasks

            try:  # kept: indexing the harness's own tasks takes ~20 s, once per run instead of per evaluation
                self.task_manager = find_tasks(self.cfg.harness_tasks, self.cfg.harness_task_dir,
                                               where="eval.harness_tasks")
            except KeyError as err:
                problem = [err.args[0]]
        dist.broadcast_object_list(problem, src=LEADER)
        if problem[0] is not None:
            raise ConfigError(problem[0])

    def maybe_run(self) -> None:
        t = self.trainer
        step = t.state.step
        if harness_due(step, t.cfg.train.steps, self.cfg.harness_interval, t.cfg.checkpoint.interval):
            self.run(step)

    def run(self, step: int) -> dict | None:
        """Collective: evaluate the live model now; rank 0 writes and logs the results and returns them."""
        t, started = self.trainer, time.perf_counter()
        scorer = self._scorer()
        t.engine.eval()
        results = None
        try:
            if t.rank != LEADER:
                scorer.serve()
                return None
            results = self._lead(scorer, step)
        finally:
            t.engine.train()
        if results is not None:
            self._report(results, step, time.perf_counter() - started)
        return results

    def _scorer(self) -> SplitScorer:
        from megatron.core import parallel_state as ps

        t = self.trainer
        model = native_lm(lambda ids, doc_start: t.engine(ids, doc_start=doc_start), eos_id=t.tokenizer.eos_id,
                          vocab_size=t.tokenizer.vocab_size, reset_documents=t.cfg.model.reset_at_document_boundary,
                          tp_group=ps.get_tensor_model_parallel_group(), device=t.engine.device,
                          pad_to=t.tp if t.cfg.parallel.sequence_parallel else 1)
        layout = ReplicaLayout(dp_rank=t.dp_rank, dp_size=t.dp_size, reports=t.tp_rank == 0, dp_group=t.dp_group,
                               lockstep=t.engine.zero_optimization_stage() == 3 and t.dp_size > 1,
                               device=comm_device())
        beat = t.watchdog.step_started if t.watchdog else None  # every scoring call is progress
        return SplitScorer(LocalScorer(model, t.tokenizer, self.cfg.harness_batch_size, reuse_prefix=False),
                           layout, progress=beat)

    def _lead(self, scorer: SplitScorer, step: int) -> dict | None:
        """Rank 0: the harness, then the other ranks released. A failure of the harness itself (a task's data
        file gone) is logged and training goes on; a failure inside a scoring call (the model's forward) ends
        the run like a failed training step, since the ranks are no longer in step."""
        from hgrn_megatron.harness.tasks import run_tasks

        cfg = self.cfg
        try:
            results = run_tasks(scorer, self.trainer.tokenizer, cfg.harness_tasks, task_dir=cfg.harness_task_dir,
                                limit=cfg.harness_limit, num_fewshot=cfg.harness_num_fewshot,
                                log_samples=cfg.harness_log_samples, where="eval.harness_tasks",
                                manager=self.task_manager)
        except Exception:  # noqa: BLE001 - an evaluation sink must not stop training
            if scorer.failed:
                raise
            log.exception("step %d: harness evaluation failed; training goes on", step)
            results = None
        scorer.stop()
        return results

    def _report(self, results: dict, step: int, seconds: float) -> None:
        from hgrn_megatron.harness.tasks import write_results

        t = self.trainer
        results["hgrn_training"] = {"step": step, "dp_size": t.dp_size, "tp_size": t.tp,
                                    "zero_stage": t.cfg.parallel.zero_stage, "seconds": round(seconds, 3)}
        path = t.run_dir / "eval" / f"step-{step:08d}.json"
        write_results(results, path, merge=True)
        record = metric_record(results, step)
        record["eval/seconds"] = seconds
        record["eval/requests"] = results["hgrn_throughput"]["loglikelihood_requests"]
        shown = " | ".join(f"{k[5:]} {v:.4f}" for k, v in record.items()
                           if k.startswith("eval/") and "_stderr" not in k and k.count("/") == 2)
        log.info("step %d | eval %s | %d requests in %.1f s -> %s", step, shown, record["eval/requests"], seconds,
                 path)
        t.metrics.write(record, prefix="eval")
