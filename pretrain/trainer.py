"""The training loop: data → DeepSpeed engine → metrics and checkpoints, with exact resume and preemption.

`Trainer(cfg, resume)` sets up collectively on every rank (process groups, tokenizer, the checkpoint to resume,
engine, data, validation, metrics); `Trainer.train()` is the loop, one iteration per optimizer step:

    train_step → log_interval → maybe_evaluate → harness (eval.harness_tasks) → maybe_checkpoint → stop at the
    end or when the ranks agree to

The run's progress is one `TrainState` (`train_state.py`), which checkpoints save and resumes restore.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..context_parallel import sequence_piece
from . import EXIT_OK, EXIT_REQUEUE
from . import checkpoint as ckpt_io
from .config import RunConfig, dump_config
from .data import model_inputs
from .distributed import (
    all_reduce_flag,
    all_reduce_max,
    comm_device,
    init_distributed,
    init_model_parallel,
    launch_env,
    set_collective_timeout,
)
from .engine import (
    grad_norm,
    learning_rate,
    seed_rank_rngs,
    set_learning_rate,
    step_without_update,
)
from .evaluation import evaluate
from .fault_injection import FaultInjection
from .harness_eval import HarnessEval
from .metrics import MetricsWriter, StartupTimeline, console_line, data_metrics, device_peak_flops, memory_gib
from .preemption import StopRequest
from .resume import ResumeMixin
from .run_lock import lock_run_dir
from .train_state import RunLayout, TrainState, run_state_dict
from .watchdog import Watchdog

log = logging.getLogger("hgrn_megatron.pretrain")


class TrainingAborted(RuntimeError):
    """The run cannot continue (e.g. K non-finite steps in a row); nothing poisoned was checkpointed."""


@dataclass
class TrainResult:
    exit_code: int
    step: int
    reason: str


def train(cfg: RunConfig, resume: str = "auto") -> TrainResult:
    """Run (or continue) the training job described by `cfg`. Collective over all ranks."""
    # A hang watchdog from the start: set-up gets its own (longer) allowance, then every step must progress.
    watchdog = Watchdog(cfg.run_dir, launch_env().rank, cfg.train.hang_timeout_minutes * 60,
                        cfg.train.hang_startup_minutes * 60)
    try:
        trainer = Trainer(cfg, resume, watchdog)
        try:
            return trainer.train()
        finally:
            trainer.close()
    finally:
        watchdog.stop()  # on every path: an in-process caller must not be ended by a later trip


class Trainer(ResumeMixin):
    """One training run on this rank. Construction and `train()` are collective over all ranks."""

    def __init__(self, cfg: RunConfig, resume: str = "auto", watchdog: Watchdog | None = None):
        self.cfg, self.watchdog = cfg, watchdog
        # Signal handlers first: a preemption notice during the (minutes-long) set-up is kept, not lost.
        self.stop = StopRequest(cfg.train.preemption_signals, cfg.train.exit_after_minutes)
        self.faults = FaultInjection.from_env()
        self.startup = StartupTimeline()
        self._init_parallel()
        self.startup.mark("process groups")
        self.harness = HarnessEval(self) if cfg.eval.harness_tasks else None  # rank 0 checks the task names
        from ..tokenizer import Tokenizer, padded_vocab_size

        self.tokenizer = Tokenizer.load(cfg.tokenizer.model)
        self.layout = RunLayout(
            world_size=self.world, dp_size=self.dp_size, tp_size=self.tp, zero_stage=cfg.parallel.zero_stage,
            tokenizer_sha256=self.tokenizer.sha256, vocab_size=self.tokenizer.vocab_size,
            padded_vocab_size=padded_vocab_size(self.tokenizer.vocab_size, self.tp), cp_size=self.cp,
        )
        self.parent: tuple[str, int] | None = None  # the checkpoint a new phase started from
        ckpt_dir, saved, universal = self._resume(resume)
        self._write_config()
        self.checkpointer = ckpt_io.Checkpointer(self.engine, self.ckpt_root,
                                                 ckpt_io.RetentionPolicy.from_config(cfg.checkpoint),
                                                 background=cfg.checkpoint.async_save)
        self.state, data_state = TrainState(), None
        if ckpt_dir:
            self.state = TrainState.from_run_state(saved)
            data_state = ckpt_io.load_data_state(ckpt_dir)
            if universal:
                seed_rank_rngs(cfg.train.seed, self.rank, self.state.step)
            log.info("resumed from %s at step %d (%s)", ckpt_dir, self.state.step,
                     "universal: new DP/TP size" if universal else "exact")
        self.startup.mark("data state" if ckpt_dir else "model build")
        self._build_data(data_state)
        self.startup.mark("data and validation")
        self.metrics = MetricsWriter(self.run_dir, cfg.logging.tensorboard, enabled=self.rank == 0,
                                     start_step=self.state.step, wandb=cfg.logging.wandb,
                                     run_config=cfg.model_dump(mode="json"))
        if self.parent:
            self.metrics.write({"split": "init", "step": 0, "init_from": self.parent[0],
                                "init_from_step": self.parent[1]}, prefix="init")
        self.saved_at, self._saved_time = self.state.step, time.monotonic()
        self._interval_start, self._interval_wait, self._interval_steps = time.perf_counter(), 0.0, 0
        self._describe()
        if self.rank == 0:
            log.info("start-up: %s", self.startup.summary())

    # ------------------------------------------------------------ set-up
    def _init_parallel(self) -> None:
        from megatron.core import parallel_state as ps

        cfg = self.cfg
        init_distributed(cfg.parallel.backend)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        cfg.validate_world(self.world)
        self.tp, self.cp = cfg.parallel.tensor_parallel_size, cfg.parallel.context_parallel_size
        init_model_parallel(self.tp, self.cp)
        # The data pipeline deals sequences to the DP replicas; the CP ranks of a replica share each sequence,
        # each taking its piece. Losses and gradients are averaged over DP x CP (`dp_group`).
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.tp_rank, self.cp_rank = ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank()
        self.cp_group = ps.get_context_parallel_group()
        self.dp_group = ps.get_data_parallel_group(with_context_parallel=True)
        self.grad_accum = cfg.grad_accumulation_steps(self.dp_size)
        self.run_dir, self.ckpt_root = Path(cfg.run_dir), Path(cfg.run_dir) / "checkpoints"
        # One trainer per run directory: held until this process exits; RunDirLocked on every rank if refused.
        self.run_lock = lock_run_dir(self.run_dir, self.rank)

    def _write_config(self) -> None:
        """Rank 0: the resolved config into RUN_DIR, once the resume checks passed (a refused resume leaves the
        run's config as it was)."""
        if self.rank == 0:
            try:
                ckpt_io.atomic_write_bytes(self.run_dir / "config.yaml", dump_config(self.cfg).encode())
            except OSError as err:
                where = self.run_dir / "config.yaml"
                raise ckpt_io.CheckpointWriteError(ckpt_io.describe_write_error(err, where)) from None

    def _build_data(self, data_state: dict | None) -> None:
        from megatron.core import parallel_state as ps

        from .data import TrainLoader, build_validation_batches
        from .data.tp_loader import GroupLoader

        cfg, seq, mb = self.cfg, self.cfg.model.seq_length, self.cfg.train.micro_batch_size

        def make_loader():
            return TrainLoader(cfg.data, self.tokenizer, seq, mb, self.dp_rank, self.dp_size, state=data_state)

        # The TP x CP ranks of a replica train on the same samples: its first rank loads them and broadcasts
        # each micro-batch, so a document is read and tokenized once per replica.
        if self.tp * self.cp > 1:
            self.loader = GroupLoader(make_loader, ps.get_tensor_and_context_parallel_group(), seq, mb,
                                      cfg.data.lanes, device=comm_device())
        else:
            self.loader = make_loader()
        self.val_batches, self.val_sources = [], []
        if cfg.train.eval_interval:
            val = build_validation_batches(cfg.data, self.tokenizer, seq, mb, self.dp_rank, self.dp_size,
                                           cache_dir=self.run_dir / "cache")
            self.val_batches, self.val_sources = val["batches"], val["source_names"]
        self.evaluating = bool(cfg.train.eval_interval) and all_reduce_max(len(self.val_batches)) > 0
        # Under ZeRO-3 a rank past its own validation batches runs this one (and discards it) while others go on.
        self.val_filler = {"tokens": torch.zeros(mb, seq + 1, dtype=torch.long),
                           "doc_start": torch.zeros(mb, seq + 1, dtype=torch.bool)}
        if cfg.train.eval_interval and not self.evaluating and self.rank == 0:
            log.warning("train.eval_interval is %d but there are no validation samples (data.valid_shards: %s); "
                        "validation is off", cfg.train.eval_interval, cfg.data.valid_shards or "none")

    def _describe(self) -> None:
        from ..flops import count_parameters, flops_per_token

        cfg = self.cfg
        self.flops_per_token = flops_per_token(cfg.model, self.layout.padded_vocab_size, cfg.model.seq_length)
        self.peak_flops = device_peak_flops(cfg.train.precision)
        self.zero0 = cfg.parallel.zero_stage == 0 and cfg.train.precision == "fp32"
        if self.rank == 0:
            n_params = count_parameters(cfg.model, self.layout.padded_vocab_size)
            log.info(
                "training %s: ~%.1fM parameters, world %d (tp %d x dp %d), ZeRO %d, %s, micro %d x accum %d, seq %d",
                cfg.model.preset or "custom", n_params / 1e6, self.world, self.tp, self.dp_size,
                cfg.parallel.zero_stage, cfg.train.precision, cfg.train.micro_batch_size, self.grad_accum,
                cfg.model.seq_length,
            )

    # ------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        cfg, state = self.cfg, self.state
        if state.validation_due and not self.maybe_evaluate(force=True):
            return self._requeue()
        while state.step < cfg.train.steps:
            self.faults.maybe_kill(state.step + 1, self.rank)
            if self.watchdog:
                self.watchdog.step_started()
            self.train_step()
            if self.watchdog and self.watchdog.beat(state.step):
                # Start-up is over: a collective that waits far longer than a step now fails instead of hanging.
                set_collective_timeout(cfg.train.collective_timeout_minutes)
            self.log_interval()
            if not self.maybe_evaluate():
                return self._requeue()
            if self.harness:
                self.harness.maybe_run()
            self.maybe_checkpoint()
            self.checkpointer.poll()
            if state.step == cfg.train.steps:
                break
            if self.stop.agreed():
                return self._requeue()
        self.checkpointer.finish()
        return TrainResult(EXIT_OK, state.step, "finished")

    def train_step(self) -> None:
        """One optimizer step over `grad_accum` micro-batches; a non-finite loss or gradient skips the update."""
        cfg, engine = self.cfg, self.engine
        self.lr = learning_rate(cfg, self.state.step)
        set_learning_rate(engine, self.lr)
        losses = []
        for micro in range(self.grad_accum):
            t_wait = time.perf_counter()
            batch = next(self.loader)
            self._interval_wait += time.perf_counter() - t_wait
            x = self._piece(model_inputs(batch, engine.device))
            loss = engine(x.input_ids, labels=x.labels, doc_start=x.doc_start).float().mean()
            if self.faults.poisons(self.state.step + 1):
                loss = loss * float("nan")
            engine.backward(loss)
            losses.append(loss.detach())
            if micro == self.grad_accum - 1 and self.zero0:
                # ZeRO >= 1 and bf16 measure the gradient norm and skip non-finite updates inside DeepSpeed;
                # plain fp32 data parallelism does neither, so the trainer does both here.
                self._zero0_grad_norm = grad_norm(engine)
                finite = math.isfinite(self._zero0_grad_norm) and torch.isfinite(torch.stack(losses)).all()
                if all_reduce_flag(not finite):
                    step_without_update(engine)
                    continue
            engine.step()
        self._finish_step(losses)

    def _finish_step(self, losses: list[torch.Tensor]) -> None:
        """Agree on the step's loss and gradient norm, count the step, abort on too long a non-finite streak."""
        cfg, state = self.cfg, self.state
        step_loss = torch.stack(losses).mean()
        dist.all_reduce(step_loss, group=self.dp_group)
        step_loss = step_loss.item() / self.layout.zero_partitions
        grad_norm = self._zero0_grad_norm if self.zero0 else self.engine.get_global_grad_norm()
        self.grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        applied = self.engine.was_step_applied() and math.isfinite(step_loss) and math.isfinite(self.grad_norm)
        samples = cfg.train.global_batch_size
        state.record_step(step_loss, applied, samples, samples * cfg.model.seq_length)
        self._interval_steps += 1
        if not applied:
            log.warning("step %d: non-finite loss/grad norm (%s / %s); update skipped", state.step, step_loss,
                        self.grad_norm)
            if state.nonfinite_in_a_row >= cfg.train.max_nonfinite_in_a_row:
                raise TrainingAborted(
                    f"{state.nonfinite_in_a_row} non-finite steps in a row (train.max_nonfinite_in_a_row = "
                    f"{cfg.train.max_nonfinite_in_a_row}) at step {state.step}; stopping without checkpointing"
                )

    def log_interval(self) -> None:
        """At every `log_interval`-th step (and the last): one console line, one metrics record."""
        cfg, state = self.cfg, self.state
        if state.step % cfg.logging.log_interval and state.step != cfg.train.steps:
            return
        elapsed = max(time.perf_counter() - self._interval_start, 1e-9)
        steps = max(self._interval_steps, 1)
        tokens_per_s = self._interval_steps * cfg.train.global_batch_size * cfg.model.seq_length / elapsed
        loss, skipped = state.take_interval()
        record = {
            "split": "train", "step": state.step, "total_steps": cfg.train.steps,
            "loss": loss, "lr": self.lr, "grad_norm": self.grad_norm, "tokens_per_s": tokens_per_s,
            "mfu": self.flops_per_token * tokens_per_s / (self.peak_flops * self.world) if self.peak_flops else None,
            "memory_gib": memory_gib(), "data_wait_pct": 100.0 * self._interval_wait / elapsed,
            "skipped_steps": state.skipped_steps, "skipped_in_interval": skipped,
            "step_time_s": elapsed / steps, "eta_s": (cfg.train.steps - state.step) * elapsed / steps,
            "consumed_samples": state.consumed_samples, "consumed_tokens": state.consumed_tokens,
            **data_metrics(self.loader, self.dp_group),
        }
        if self.rank == 0:
            log.info(console_line(record))
        self.metrics.write(record)
        self._interval_start, self._interval_wait, self._interval_steps = time.perf_counter(), 0.0, 0

    def maybe_evaluate(self, force: bool = False) -> bool:
        """Validate at every `eval_interval`-th step and the last (or now, when `force`). False if the ranks agreed
        to stop part-way: the checkpoint then records the validation as due, and the resume runs it first."""
        cfg, state = self.cfg, self.state
        due = self.evaluating and (force or state.step % cfg.train.eval_interval == 0 or state.step == cfg.train.steps)
        if not due:
            state.validation_due = False
            return True
        self.faults.maybe_preempt_validation(state.step)
        val = evaluate(self.engine, self.val_batches, self.val_sources, self.dp_group, self.stop, self.val_filler,
                       piece=self._piece)
        if val is None:
            state.validation_due = True
            return False
        state.validation_due = False
        state.last_val_loss = val["val_loss"]
        if self.rank == 0:
            log.info("step %d | val loss %.4f | val ppl %.2f", state.step, val["val_loss"], val["val_ppl"])
        self.metrics.write({"split": "val", "step": state.step, **val}, prefix="val")
        return True

    def maybe_checkpoint(self) -> None:
        """Save at every `checkpoint.interval`-th step, every `interval_minutes` and at the end; never inside a
        non-finite streak."""
        cfg, state = self.cfg, self.state
        at_end = state.step == cfg.train.steps
        due = bool(cfg.checkpoint.interval) and state.step % cfg.checkpoint.interval == 0
        if cfg.checkpoint.interval_minutes and not due:
            overdue = time.monotonic() - self._saved_time >= 60 * cfg.checkpoint.interval_minutes
            due = all_reduce_flag(overdue)  # the ranks' clocks differ: one rank's deadline decides for all
        if (at_end and cfg.checkpoint.save_at_end) or (due and not state.nonfinite_in_a_row):
            self.save()
        elif due:  # inside a non-finite streak: keep the last clean checkpoint as the newest
            log.warning("step %d: checkpoint deferred (non-finite streak of %d)", state.step, state.nonfinite_in_a_row)

    def save(self) -> None:
        """Collective: a checkpoint of this step (model, optimizer, RNG, data position, `TrainState`)."""
        from hgrn_megatron.corpus.shards import DataError

        from .data import merge_data_states

        # Only rank 0 writes the data state: the ranks' states go to it alone (an all-gather would hand every rank
        # every rank's state, a cost per rank that grows with the job), and its verdict comes back.
        states = [None] * self.world if self.rank == 0 else None
        dist.gather_object((self.tp_rank + self.cp_rank, self.loader.state_dict()), states, dst=0)
        data_global, problem = None, [None]
        if self.rank == 0:
            try:
                data_global = merge_data_states([s for first, s in states if first == 0])  # one per DP replica
            except DataError as err:
                problem = [str(err)]
        dist.broadcast_object_list(problem, src=0)
        if problem[0] is not None:
            raise DataError(problem[0])
        self.checkpointer.save(self.state.step, run_state_dict(self.state, self.layout), data_global,
                               dump_config(self.cfg))
        self.saved_at, self._saved_time = self.state.step, time.monotonic()
        self.faults.maybe_kill_during_save(self.state.step, self.rank)
        log.info("%s checkpoint of step %d", "started the" if self.cfg.checkpoint.async_save else "saved the",
                 self.state.step)

    def _piece(self, tensors):
        """This rank's piece of every [b, s] tensor in `tensors` (a NamedTuple), under context parallelism."""
        if self.cp == 1:
            return tensors
        parts = [None if t is None else sequence_piece(t, self.cp_group) for t in tensors]
        return type(tensors)(*parts) if hasattr(tensors, "_fields") else tuple(parts)

    def _requeue(self) -> TrainResult:
        """Save (unless this step is saved already) and return the requeue result."""
        if self.saved_at != self.state.step or self.state.validation_due:
            self.save()
        self.checkpointer.finish()
        result = TrainResult(EXIT_REQUEUE, self.state.step, self.stop.local_reason() or "stop requested by a peer")
        log.info("stopping at step %d to be requeued: %s", self.state.step, result.reason)
        return result

    def close(self) -> None:
        self.loader.close()
        self.metrics.close()
