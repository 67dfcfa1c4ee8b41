"""The training loop: data → DeepSpeed engine → metrics and checkpoints, with exact resume and preemption.

Reads top to bottom: set-up (process groups, tokenizer, resume choice, engine, data), then one iteration per
optimizer step (micro-batches, skip on non-finite, log, evaluate, checkpoint, stop when asked).
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import EXIT_OK, EXIT_REQUEUE
from . import checkpoint as ckpt_io
from .config import RunConfig, dump_config
from .distributed import (
    all_reduce_flag,
    all_reduce_max,
    comm_device,
    init_distributed,
    init_model_parallel,
    launch_env,
    set_collective_timeout,
)
from .engine import build_engine, learning_rate, set_learning_rate
from .evaluation import evaluate
from .metrics import MetricsWriter, console_line, device_peak_flops, memory_gib
from .preemption import StopRequest
from .watchdog import Watchdog

log = logging.getLogger("hgrn_megatron.pretrain")


class TrainingAborted(RuntimeError):
    """The run cannot continue (e.g. K non-finite steps in a row); nothing poisoned was checkpointed."""


@dataclass
class TrainResult:
    exit_code: int
    step: int
    reason: str


def _seed_rank_rngs(seed: int, rank: int, step: int) -> None:
    s = seed + 1000003 * rank + step
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def _grad_norm(engine) -> float:
    """Global L2 norm of the (already data-parallel-reduced) gradients, counting TP-replicated ones once."""
    from deepspeed.runtime.utils import clip_grad_norm_

    params = [p for p in engine.module.parameters() if p.grad is not None]
    return float(clip_grad_norm_(params, max_norm=float("inf"), mpu=engine.mpu)) if params else 0.0


def _step_without_update(engine) -> None:
    """engine.step() (micro-step counters, zeroed gradients) without touching parameters or AdamW state."""
    for p in engine.module.parameters():
        if p.grad is not None:
            p.grad.zero_()  # finite, so DeepSpeed's clipping pass computes a norm of 0
    optimizer = engine.optimizer
    optimizer.step = lambda *args, **kwargs: None  # instance attribute shadows the bound method once
    try:
        engine.step()
    finally:
        del optimizer.step


def _data_totals(loader, dp_group) -> dict:
    """Documents read and bad records skipped (by kind) over all data-parallel ranks, each lane counted once."""
    from .data import SKIP_KINDS

    stats = loader.stats()
    per_lane = torch.from_numpy(loader.lane_counts(SKIP_KINDS)).to(comm_device())
    dist.all_reduce(per_lane, op=dist.ReduceOp.MAX, group=dp_group)
    t = per_lane.sum(dim=0).cpu()
    out = {"data_documents": int(t[0]), "data_skipped_records": int(t[1:].sum())}
    out.update({f"data_skipped/{k}": int(v) for k, v in zip(SKIP_KINDS, t[1:].tolist()) if v})
    out["data_loader_tokens_per_s"] = stats.get("loader_tokens_per_s")
    return out


def train(cfg: RunConfig, resume: str = "auto") -> TrainResult:
    """Run (or continue) the training job described by `cfg`. Collective over all ranks."""
    watchdog = Watchdog(cfg.run_dir, launch_env().rank, cfg.train.hang_timeout_minutes * 60,
                        cfg.train.hang_startup_minutes * 60)
    try:
        return _train(cfg, resume, watchdog)
    finally:
        watchdog.stop()


def _train(cfg: RunConfig, resume: str, watchdog: Watchdog) -> TrainResult:
    from megatron.core import parallel_state as ps

    from hgrn_megatron.flops import count_parameters, flops_per_token
    from hgrn_megatron.tokenizer import Tokenizer, padded_vocab_size

    from .data import TrainLoader, build_validation_batches, merge_data_states

    # ------------------------------------------------------------ set-up
    # Signal handlers first: a preemption notice during the (minutes-long) set-up is kept, not lost.
    stop = StopRequest(cfg.train.preemption_signals, cfg.train.exit_after_minutes)
    init_distributed(cfg.parallel.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg.validate_world(world)
    tp = cfg.parallel.tensor_parallel_size
    init_model_parallel(tp)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    tp_rank = ps.get_tensor_model_parallel_rank()
    run_dir, ckpt_root = Path(cfg.run_dir), Path(cfg.run_dir) / "checkpoints"
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt_io.atomic_write_bytes(run_dir / "config.yaml", dump_config(cfg).encode())

    tokenizer = Tokenizer.load(cfg.tokenizer.model)
    padded_vocab = padded_vocab_size(tokenizer.vocab_size, tp)

    # Rank 0 chooses the checkpoint (the newest that verifies) and every rank follows that choice, or raises
    # the same error. Checkpoints after the chosen step belong to an abandoned run: rank 0 sets them aside.
    choice = [None]
    if rank == 0:
        try:
            chosen = ckpt_io.resolve_checkpoint_arg(resume, ckpt_root)
            choice = [("ok", str(chosen or ""))]
            start = ckpt_io.read_run_state(chosen)["step"] if chosen else 0
            if moved := ckpt_io.set_aside_later_checkpoints(ckpt_root, start):
                log.warning("checkpoints after step %d (an abandoned run) moved to %s", start, moved)
        except ckpt_io.CheckpointError as err:
            choice = [("error", str(err))]
    dist.broadcast_object_list(choice, src=0)
    if choice[0][0] == "error":
        raise ckpt_io.CheckpointError(choice[0][1])
    ckpt_dir = Path(choice[0][1]) if choice[0][1] else None
    run_state = ckpt_io.read_run_state(ckpt_dir) if ckpt_dir else None
    if run_state and run_state["tokenizer_sha256"] != tokenizer.sha256:
        raise ckpt_io.CheckpointError(
            f"{ckpt_dir}: trained with tokenizer sha256 {run_state['tokenizer_sha256'][:12]}..., but "
            f"{cfg.tokenizer.model} has {tokenizer.sha256[:12]}...; resume with the same tokenizer"
        )
    # Another DP or TP size goes through DeepSpeed's universal (layout-free) checkpoint; TP merges need the
    # per-parameter rules that checkpoints record since run-state format 2.
    universal = bool(run_state) and (run_state["dp_size"], run_state["tp_size"]) != (dp_size, tp)
    if universal and run_state["tp_size"] != tp and run_state.get("format", 1) < 2:
        raise ckpt_io.CheckpointError(
            f"{ckpt_dir}: changing TP ({run_state['tp_size']} -> {tp}) needs a checkpoint that records its TP merge "
            "rules (saved by this version); resume it at its own TP size once and save again"
        )

    engine = build_engine(cfg, padded_vocab, dp_size, load_universal=universal)
    device = engine.device  # the loader yields CPU tensors; the model may live on a GPU
    _seed_rank_rngs(cfg.train.seed, rank, 0)
    step, consumed_samples, skipped_total, in_a_row, data_state = 0, 0, 0, 0, None
    if ckpt_dir:
        ckpt_io.load_checkpoint(engine, ckpt_dir, universal=universal)
        step, consumed_samples = run_state["step"], run_state["consumed_samples"]
        skipped_total = run_state.get("skipped_steps", 0)
        in_a_row = run_state.get("nonfinite_in_a_row", 0)  # a streak goes on across a requeue
        data_state = ckpt_io.load_data_state(ckpt_dir)
        if universal:
            _seed_rank_rngs(cfg.train.seed, rank, step)
        log.info("resumed from %s at step %d (%s)", ckpt_dir, step,
                 "universal: new DP/TP size" if universal else "exact")

    seq = cfg.model.seq_length
    mb, ga = cfg.train.micro_batch_size, cfg.grad_accumulation_steps(dp_size)
    loader = TrainLoader(cfg.data, tokenizer, seq, mb, dp_rank, dp_size, state=data_state)
    val_batches, val_sources = [], []
    if cfg.train.eval_interval:
        val = build_validation_batches(cfg.data, tokenizer, seq, mb, dp_rank, dp_size)
        val_batches, val_sources = val["batches"], val["source_names"]
    evaluating = bool(cfg.train.eval_interval) and all_reduce_max(len(val_batches)) > 0
    val_filler = {"tokens": torch.zeros(mb, seq + 1, dtype=torch.long),
                  "doc_start": torch.zeros(mb, seq + 1, dtype=torch.bool)}
    if cfg.train.eval_interval and not evaluating and rank == 0:
        log.warning("train.eval_interval is %d but there are no validation samples (data.valid_shards: %s); "
                    "validation is off", cfg.train.eval_interval, cfg.data.valid_shards or "none")

    metrics = MetricsWriter(run_dir, cfg.logging.tensorboard, enabled=rank == 0, start_step=step)
    flops_tok = flops_per_token(cfg.model, padded_vocab, seq)
    peak = device_peak_flops(cfg.train.precision)
    inject = set(cfg.train.inject_nonfinite_at_steps)
    zero0 = cfg.parallel.zero_stage == 0 and cfg.train.precision == "fp32"
    if rank == 0:
        n_params = count_parameters(cfg.model, padded_vocab)  # this rank's shard x TP would count replicas
        log.info(
            "training %s: ~%.1fM parameters, world %d (tp %d x dp %d), ZeRO %d, %s, micro %d x accum %d, seq %d",
            cfg.model.preset or "custom", n_params / 1e6, world, tp, dp_size, cfg.parallel.zero_stage,
            cfg.train.precision, mb, ga, seq,
        )

    def save(at_step: int) -> None:
        states = [None] * world
        dist.all_gather_object(states, (tp_rank, loader.state_dict()))
        data_global = merge_data_states([s for t, s in states if t == 0])
        run_state_out = {
            "format": 2,  # 2: the DeepSpeed checkpoint records TP merge rules (a TP change can resume from it)
            "step": at_step, "consumed_samples": consumed_samples, "consumed_tokens": consumed_samples * seq,
            "world_size": world, "dp_size": dp_size, "tp_size": tp, "zero_stage": cfg.parallel.zero_stage,
            "tokenizer_sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
            "padded_vocab_size": padded_vocab, "skipped_steps": skipped_total, "nonfinite_in_a_row": in_a_row,
            "last_val_loss": last_val_loss,
        }
        nonlocal saved_at
        saved_at = at_step
        path = ckpt_io.save_checkpoint(
            engine, ckpt_root, at_step, run_state_out, data_global, dump_config(cfg),
            cfg.checkpoint.keep_last, cfg.checkpoint.keep_every,
        )
        log.info("saved checkpoint %s", path)

    # ------------------------------------------------------------ loop
    last_val_loss = run_state.get("last_val_loss") if run_state else None
    interval_losses, interval_skipped = [], 0
    interval_start, interval_wait, interval_steps = time.perf_counter(), 0.0, 0
    result: TrainResult | None = None
    saved_at = step
    try:
        while step < cfg.train.steps:
            watchdog.step_started()
            lr = learning_rate(cfg, step)
            set_learning_rate(engine, lr)
            local_losses = []
            for micro in range(ga):
                t_wait = time.perf_counter()
                batch = next(loader)
                interval_wait += time.perf_counter() - t_wait
                tokens = batch["tokens"].to(device, non_blocking=True)
                doc_start = batch["doc_start"].to(device, non_blocking=True)
                loss = engine(tokens[:, :-1], labels=tokens[:, 1:], doc_start=doc_start[:, :-1]).float().mean()
                if step + 1 in inject:
                    loss = loss * float("nan")
                engine.backward(loss)
                local_losses.append(loss.detach())
                if micro == ga - 1 and zero0:
                    # ZeRO >= 1 and bf16 measure the gradient norm and skip non-finite updates inside DeepSpeed;
                    # plain fp32 data parallelism does neither, so the trainer does both here.
                    zero0_grad_norm = _grad_norm(engine)
                    finite = math.isfinite(zero0_grad_norm) and torch.isfinite(torch.stack(local_losses)).all()
                    if all_reduce_flag(not finite):
                        _step_without_update(engine)
                        continue
                engine.step()
            step += 1
            consumed_samples += cfg.train.global_batch_size

            step_loss = torch.stack(local_losses).mean()
            dist.all_reduce(step_loss, group=ps.get_data_parallel_group())
            step_loss = step_loss.item() / dp_size
            grad_norm = zero0_grad_norm if zero0 else engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            applied = engine.was_step_applied() and math.isfinite(step_loss) and math.isfinite(grad_norm)
            if applied:
                in_a_row = 0
                interval_losses.append(step_loss)
            else:
                in_a_row += 1
                skipped_total += 1
                interval_skipped += 1
                log.warning("step %d: non-finite loss/grad norm (%s / %s); update skipped", step, step_loss, grad_norm)
                if in_a_row >= cfg.train.max_nonfinite_in_a_row:
                    raise TrainingAborted(
                        f"{in_a_row} non-finite steps in a row (train.max_nonfinite_in_a_row = "
                        f"{cfg.train.max_nonfinite_in_a_row}) at step {step}; stopping without checkpointing"
                    )
            interval_steps += 1
            if watchdog.beat(step):  # start-up is over: collectives need not wait init's 30 minutes any more
                set_collective_timeout(cfg.train.collective_timeout_minutes)

            if step % cfg.logging.log_interval == 0 or step == cfg.train.steps:
                elapsed = time.perf_counter() - interval_start
                tokens_per_s = interval_steps * cfg.train.global_batch_size * seq / max(elapsed, 1e-9)
                data_totals = _data_totals(loader, ps.get_data_parallel_group())
                record = {
                    "split": "train", "step": step, "total_steps": cfg.train.steps,
                    "loss": float(np.mean(interval_losses)) if interval_losses else float("nan"),
                    "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                    "mfu": flops_tok * tokens_per_s / (peak * world) if peak else None,
                    "memory_gib": memory_gib(), "data_wait_pct": 100.0 * interval_wait / max(elapsed, 1e-9),
                    "skipped_steps": skipped_total, "skipped_in_interval": interval_skipped,
                    "step_time_s": elapsed / interval_steps,
                    "eta_s": (cfg.train.steps - step) * elapsed / interval_steps,
                    "consumed_samples": consumed_samples, "consumed_tokens": consumed_samples * seq,
                    **data_totals,
                }
                if rank == 0:
                    log.info(console_line(record))
                metrics.write(record)
                interval_losses, interval_skipped, interval_wait, interval_steps = [], 0, 0.0, 0
                interval_start = time.perf_counter()

            if evaluating and (step % cfg.train.eval_interval == 0 or step == cfg.train.steps):
                val = evaluate(engine, val_batches, val_sources, ps.get_data_parallel_group(), stop, val_filler)
                if val is None:  # preempted during evaluation
                    save(step)
                    result = TrainResult(EXIT_REQUEUE, step, stop.local_reason() or "stop requested by a peer")
                    break
                last_val_loss = val["val_loss"]
                if rank == 0:
                    log.info("step %d | val loss %.4f | val ppl %.2f", step, val["val_loss"], val["val_ppl"])
                metrics.write({"split": "val", "step": step, **val}, prefix="val")

            at_end = step == cfg.train.steps
            due = bool(cfg.checkpoint.interval) and step % cfg.checkpoint.interval == 0
            if (at_end and cfg.checkpoint.save_at_end) or (due and not in_a_row):
                save(step)
            elif due:  # inside a non-finite streak: keep the last clean checkpoint as the newest
                log.warning("step %d: checkpoint deferred (non-finite streak of %d)", step, in_a_row)
            if at_end:
                break
            if stop.agreed():
                if saved_at != step:
                    save(step)
                result = TrainResult(EXIT_REQUEUE, step, stop.local_reason() or "stop requested by a peer")
                log.info("stopping at step %d to be requeued: %s", step, result.reason)
                break
    finally:
        loader.close()
        metrics.close()
    return result or TrainResult(EXIT_OK, step, "finished")
