"""Choosing and loading the checkpoint a run starts from, a part of `Trainer`'s set-up (`ResumeMixin`).

The newest usable checkpoint of the run is loaded (an older one when its bytes or its load fail on any rank,
never a silent fresh start); otherwise `checkpoint.init_from`'s weights start a new phase, or the model starts
from a random initialisation. The engine is built here, without random initialisation when a checkpoint
overwrites every weight, and through DeepSpeed's universal format when the DP or TP size changed.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from . import checkpoint as ckpt_io
from .data import check_data_state
from .distributed import all_reduce_flag
from .engine import build_engine, seed_rank_rngs
from .train_state import saved_layout

log = logging.getLogger("hgrn_megatron.pretrain")


class ResumeMixin:
    """Needs the trainer's cfg, rank, world, tp, layout, tokenizer, ckpt_root, dp_size and startup; sets
    `engine` and `parent`."""

    def _resume(self, resume: str) -> tuple[Path | None, dict | None, bool]:
        """Build the engine and load the newest usable checkpoint of this run into it: (its folder, its run state,
        whether it went through the universal format), or (None, None, False) for a start at step 0, from
        `checkpoint.init_from`'s weights or from a random initialisation."""
        found = self._on_rank0(lambda: [str(p) for p in ckpt_io.resume_candidates(resume, self.ckpt_root)])
        if found:
            return self._load_first_usable(map(Path, found), new_phase=False)
        init_from = self.cfg.checkpoint.init_from
        if init_from:
            parents = self._on_rank0(lambda: [str(p) for p in ckpt_io.resume_candidates(init_from, Path(init_from))])
            if not parents:
                raise ckpt_io.CheckpointError(f"checkpoint.init_from {init_from}: no checkpoint there")
            parent, saved, _ = self._load_first_usable(map(Path, parents[:1]), new_phase=True)
            self.parent = (str(parent), saved["step"])
            log.info("new phase from the weights%s of %s (step %d of its run)",
                     " and optimizer state" if self.cfg.checkpoint.init_optimizer else "", parent, saved["step"])
        else:
            self.engine = build_engine(self.cfg, self.layout.padded_vocab_size, self.dp_size)
        seed_rank_rngs(self.cfg.train.seed, self.rank, 0)
        self._set_aside_after(0)
        return None, None, False

    def _load_first_usable(self, candidates, new_phase: bool) -> tuple[Path, dict, bool]:
        """Load the first of `candidates` whose bytes check out and that loads; a checkpoint that does not is
        skipped (with a warning) for the next; none usable is an error, never a silent fresh start. A new phase
        (`checkpoint.init_from`) takes the weights (and, if asked, the optimizer state) only."""
        skipped, built_for, root = [], None, None
        for ckpt_dir in candidates:
            root = ckpt_dir.parent
            problem = self._agreed_problem(lambda d=ckpt_dir: ckpt_io.content_problem(d, self.rank, self.world))
            saved = None if problem else ckpt_io.read_run_state(ckpt_dir)
            if saved is not None:
                universal = self._check_resumable(ckpt_dir, saved, new_phase)
                if not new_phase:  # a data set-up that cannot continue is refused before anything is converted
                    check_data_state(self.cfg.data, self.tokenizer, self.cfg.model.seq_length,
                                     ckpt_io.load_data_state(ckpt_dir))
                if built_for != universal:  # every weight comes from the checkpoint: no random initialisation
                    self.engine, built_for = build_engine(self.cfg, self.layout.padded_vocab_size, self.dp_size,
                                                          load_universal=universal, initialize=False), universal
                seed_rank_rngs(self.cfg.train.seed, self.rank, 0)
                self.startup.mark("model build")
                optimizer = not new_phase or self.cfg.checkpoint.init_optimizer
                problem = self._agreed_problem(lambda d=ckpt_dir, u=universal: ckpt_io.load_checkpoint(
                    self.engine, d, universal=u, weights_only=new_phase, optimizer=optimizer))
                self.startup.mark(f"checkpoint load{' (universal conversion)' if universal else ''}")
            if problem is None:
                if not new_phase:
                    self._set_aside_after(saved["step"])
                return ckpt_dir, saved, universal
            log.warning("checkpoint %s is not usable (%s); trying an older one", ckpt_dir, problem)
            skipped.append(f"{ckpt_dir.name}: {problem}")
        raise ckpt_io.unusable_error(root, skipped)

    def _on_rank0(self, fn):
        """fn() on rank 0, its result (or its CheckpointError) on every rank."""
        out = [None]
        if self.rank == 0:
            try:
                out = [("ok", fn())]
            except ckpt_io.CheckpointError as err:
                out = [("error", str(err))]
        dist.broadcast_object_list(out, src=0)
        if out[0][0] == "error":
            raise ckpt_io.CheckpointError(out[0][1])
        return out[0][1]

    def _agreed_problem(self, fn) -> str | None:
        """Run fn() on every rank (it returns a problem or None, or raises); None when it succeeded everywhere,
        else this rank's problem (or that another rank had one: that rank's log names it). One flag is reduced,
        not every rank's message gathered, so the cost per rank does not grow with the job."""
        try:
            problem = fn()
        except Exception as err:  # noqa: BLE001 - a file that does not load: its reason, and try an older one
            problem = f"{type(err).__name__}: {str(err)[:300]}"
        if problem is not None:
            log.warning("rank %d: %s", self.rank, problem)
        if not all_reduce_flag(problem is not None):
            return None
        return problem or "failed on another rank (its log line names the reason)"

    def _set_aside_after(self, step: int) -> None:
        """Rank 0: checkpoints after the resumed step belong to an abandoned run; so do unfinished saves."""
        if self.rank == 0:
            ckpt_io.remove_unfinished_saves(self.ckpt_root)
            if moved := ckpt_io.set_aside_later_checkpoints(self.ckpt_root, step):
                log.warning("checkpoints after step %d (an abandoned run) moved to %s", step, moved)

    def _check_resumable(self, ckpt_dir: Path, saved: dict, new_phase: bool = False) -> bool:
        """Raise CheckpointError unless this job can continue `ckpt_dir`; True when it must go through DeepSpeed's
        universal (layout-free) checkpoint, i.e. at another DP or TP size."""
        before = saved_layout(saved)
        if before.tokenizer_sha256 != self.layout.tokenizer_sha256:
            raise ckpt_io.CheckpointError(
                f"{ckpt_dir}: trained with tokenizer sha256 {before.tokenizer_sha256[:12]}..., but "
                f"{self.cfg.tokenizer.model} has {self.layout.tokenizer_sha256[:12]}...; resume with the same tokenizer"
            )
        allowed = ckpt_io.NEW_PHASE_MODEL_CHANGES if new_phase else ckpt_io.RESUMABLE_MODEL_CHANGES
        if differences := ckpt_io.model_differences(ckpt_dir, self.cfg.model, allowed):
            raise ckpt_io.CheckpointError(
                f"{ckpt_dir}: the model differs from the checkpoint's ({'; '.join(differences)}); resume with the "
                "checkpoint's model settings, or start a new run"
            )
        universal = (before.zero_partitions, before.tp_size) != (self.layout.zero_partitions, self.tp)
        # TP merges need the per-parameter rules that checkpoints record since run-state format 2.
        if universal and before.tp_size != self.tp and saved.get("format", 1) < 2:
            raise ckpt_io.CheckpointError(
                f"{ckpt_dir}: changing TP ({before.tp_size} -> {self.tp}) needs a checkpoint that records its TP "
                "merge rules (saved by this version); resume it at its own TP size once and save again"
            )
        return universal
