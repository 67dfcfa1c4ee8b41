#!/usr/bin/env bash
# Runs one process of a training step (the trainer, or torchrun) for pretrain.sbatch and local.sh.
#
# SLURM delivers a step's signals to every process of the step, wrappers included, and where it tracks
# processes with cgroups (most clusters) it kills whatever is left of a step once each task's first process
# has exited. So this shell ignores USR1 and TERM and stays until its child has exited: the trainer installs its own handlers for both (train.preemption_signals)
# and checkpoints; torchrun, which would die of USR1 and would kill its workers 30 s after a TERM, inherits
# the ignoring and leaves the trainers to finish their checkpoint.
# torchrun exits 1 whenever a worker fails, whatever that worker's code, so a trainer that exits with the
# requeue code also leaves a marker file for the batch shell to find.
trap '' USR1 TERM
"$@"
rc=$?
if [ "$rc" = "${HGRN_REQUEUE_EXIT:-75}" ] && [ -n "${HGRN_REQUEUE_MARKER:-}" ]; then
  : >"$HGRN_REQUEUE_MARKER" 2>/dev/null || true
fi
exit "$rc"
