#!/usr/bin/env bash
# Runs one process of a training step (the trainer, or torchrun) for pretrain.sbatch and local.sh.
#
# SLURM delivers a step's signals to every process of the step, wrappers included, and where it tracks
# processes with cgroups (most clusters) it kills whatever is left of a step once each task's first process
# has exited. So this shell ignores USR1, TERM and INT and stays until its child has exited: the trainer
# installs its own handlers for them (train.preemption_signals) as the first act of its entry point, keeps a
# signal that arrives during its imports, and checkpoints. A child starts with these signals ignored (not
# with their default action, which would kill a trainer still importing torch). torchrun inherits the
# ignored USR1; it would install its own TERM handler (and kill its workers 30 s after a TERM) unless told
# which signals to handle, so TERM is left out of that list and stays ignored (launch/local.sh also leaves
# INT out, to deliver Ctrl-C to the trainers as a stop request).
# torchrun exits 1 whenever a worker fails, whatever that worker's code, so a trainer that exits with the
# requeue code also leaves a marker file for the batch shell to find; with HGRN_REQUEUE_MARKED_STATUS set
# (local.sh: 0), this worker then reports that status instead, so torchrun does not report a clean stop as
# a failure.
trap '' USR1 TERM INT
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGINT,SIGHUP,SIGQUIT}  # torchrun --signals-to-handle
# torchrun's static rendezvous needs each node's rank, which only the task itself knows (one task per node).
export PET_NODE_RANK=${PET_NODE_RANK:-${SLURM_NODEID:-0}}
# Exit records for the batch shell's failure policy (which rank ran where, how and when it ended), one file per
# training rank; torchrun's own process (no RANK yet) records nothing.
exit_record=""
if [ -n "${HGRN_EXIT_DIR:-}" ] && { [ -n "${RANK:-}" ] || [ "${HGRN_LAUNCHER:-srun}" != torchrun ]; }; then
  exit_record=$HGRN_EXIT_DIR/rank-${RANK:-${SLURM_PROCID:-0}}
  echo "start $(date +%s.%N) ${SLURMD_NODENAME:-$(hostname -s)} $$" >>"$exit_record" 2>/dev/null || exit_record=""
fi
"$@"
rc=$?
if [ -n "$exit_record" ]; then
  echo "exit $(date +%s.%N) ${SLURMD_NODENAME:-$(hostname -s)} $rc" >>"$exit_record" 2>/dev/null || true
  # One file the batch shell can poll cheaply: some rank ended with neither success nor a checkpoint.
  case "$rc" in 0 | "${HGRN_REQUEUE_EXIT:-75}") ;; *) : >"$HGRN_EXIT_DIR/failed" 2>/dev/null || true ;; esac
fi
if [ "$rc" = "${HGRN_REQUEUE_EXIT:-75}" ] && [ -n "${HGRN_REQUEUE_MARKER:-}" ]; then
  if : >"$HGRN_REQUEUE_MARKER" 2>/dev/null && [ -n "${HGRN_REQUEUE_MARKED_STATUS:-}" ]; then
    exit "$HGRN_REQUEUE_MARKED_STATUS"
  fi
fi
exit "$rc"
