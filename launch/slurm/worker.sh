#!/usr/bin/env bash
# Runs one process of a SLURM training step (the trainer, or torchrun) for launch/slurm/pretrain.sbatch.
#
# SLURM delivers a step signal to every process of the step, wrappers included. A process without a handler
# dies of USR1, so this shell ignores it; ignoring is inherited across exec, so torchrun (which has no USR1
# handler of its own) survives it too, while the trainer installs its own handler and checkpoints.
# torchrun exits 1 whenever a worker fails, whatever that worker's code, so a trainer that exits with the
# requeue code also leaves a marker file for the batch shell to find.
trap '' USR1
"$@"
rc=$?
if [ "$rc" = "${HGRN_REQUEUE_EXIT:-75}" ] && [ -n "${HGRN_REQUEUE_MARKER:-}" ]; then
  : >"$HGRN_REQUEUE_MARKER" 2>/dev/null || true
fi
exit "$rc"
