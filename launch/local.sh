#!/usr/bin/env bash
# Pretrain on one workstation with torchrun: one process per GPU, or NPROC CPU processes (gloo) without CUDA.
#
#   launch/local.sh configs/hgrn-125m.yaml [key.sub=value ...]
#   NPROC=2 launch/local.sh configs/hgrn-125m.yaml train.micro_batch_size=8
#
# To stop a run with a checkpoint, send USR1 (or TERM) to this script: it asks every trainer process to save
# at the next step boundary and exits 75 once they have; run the same command again to resume (the trainer
# resumes from the newest complete checkpoint by itself). Ctrl-C does the same (the trainers get SIGINT and
# log "interrupted (SIGINT)"); a second Ctrl-C kills the run.
#
# Environment: NPROC (default: the GPUs in CUDA_VISIBLE_DEVICES, else all GPUs, else 1), OMP_NUM_THREADS (default: CPU cores / NPROC),
# HGRN_VENV (default: the project's .venv, created by launch/setup_env.sh when missing), HGRN_TRAINER (the
# command for one training process, default `python -m hgrn_megatron.pretrain`, as in pretrain.sbatch).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ $# -lt 1 ]; then
  echo "usage: launch/local.sh CONFIG.yaml [key.sub=value ...]" >&2
  exit 2
fi
if [ ! -f "$1" ]; then
  echo "config file $1 not found" >&2
  exit 2
fi

if [ -n "${HGRN_VENV:-}" ]; then
  # shellcheck disable=SC1091
  . "$HGRN_VENV/bin/activate"
else
  # shellcheck disable=SC1091
  source "$ROOT/launch/setup_env.sh"
fi

if [ -z "${NPROC:-}" ]; then
  NPROC=1
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then  # set, even empty (the usual way to force the CPU)
    NPROC=$(awk -F, '{ print (NF > 0 ? NF : 1) }' <<<"$CUDA_VISIBLE_DEVICES")
  elif command -v nvidia-smi >/dev/null 2>&1 && GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); then
    [ "$GPUS" -gt 0 ] && NPROC=$GPUS
  fi
fi
# torchrun would set 1 thread per process; on CPU that wastes the cores the processes do not use.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE SLURM_PROCID SLURM_NTASKS SLURM_NODEID PET_NODE_RANK

# The worker script ignores USR1, TERM and INT in torchrun (whose default action would be to die of them) and
# records a trainer exit with the requeue code in a marker file; it then reports 0 to torchrun, which would
# report any other code as a failure (a ChildFailedError traceback) although the stop was clean. torchrun
# handles neither TERM nor INT here: INT (Ctrl-C) goes to the trainers themselves, as a stop request.
export HGRN_REQUEUE_EXIT=75
export HGRN_REQUEUE_MARKED_STATUS=0
export PET_SIGNALS_TO_HANDLE=SIGHUP,SIGQUIT
export HGRN_REQUEUE_MARKER=${TMPDIR:-/tmp}/hgrn-local-requeue-$$
rm -f "$HGRN_REQUEUE_MARKER"
trap 'rm -f "$HGRN_REQUEUE_MARKER"' EXIT

SIGNALS=0
INTERRUPTS=0
checkpoint_and_stop() {
  SIGNALS=$((SIGNALS + 1))
  local pid sig=USR1
  if [ "$1" = INT ]; then
    INTERRUPTS=$((INTERRUPTS + 1))
    sig=INT  # the trainers then report what it was: an interrupt, not a scheduler's USR1
    if [ "$INTERRUPTS" -gt 1 ]; then
      echo "[local] second interrupt: killing the run without a checkpoint"
      sig=KILL
    fi
  fi
  [ "$sig" = KILL ] || echo "[local] $1: asking the trainers to checkpoint and exit"
  # Every process below us: the wrappers and torchrun ignore USR1 and INT, the trainers checkpoint on them.
  [ -n "${LAUNCH_PID:-}" ] || return 0
  for pid in $(descendants "$LAUNCH_PID") "$LAUNCH_PID"; do kill -s "$sig" "$pid" 2>/dev/null || true; done
}
descendants() {
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
    echo "$child"
    descendants "$child"
  done
}
trap 'checkpoint_and_stop USR1' USR1
trap 'checkpoint_and_stop TERM' TERM
trap 'checkpoint_and_stop INT' INT
trap 'checkpoint_and_stop HUP' HUP

read -r -a TRAINER <<<"${HGRN_TRAINER:-python -m hgrn_megatron.pretrain}"
echo "[local] torchrun: ${NPROC} process(es), ${OMP_NUM_THREADS} thread(s) each; config $*"
# In a session of its own, so that Ctrl-C reaches only this script (which turns it into a checkpoint
# request) and not torchrun (which would forward SIGINT to the trainers and kill them 30 s later).
setsid bash "$ROOT/launch/slurm/worker.sh" python -m torch.distributed.run --standalone --nnodes=1 \
  --nproc-per-node="$NPROC" --no-python bash "$ROOT/launch/slurm/worker.sh" \
  "${TRAINER[@]}" --config "$@" &
LAUNCH_PID=$!

# As in pretrain.sbatch: a trapped signal interrupts `wait`; wait again while signals keep arriving.
set +e  # the run's exit status is examined below
RC=""
while :; do
  before=$SIGNALS
  wait "$LAUNCH_PID"
  rc=$?
  if [ "$rc" = 127 ] && [ -n "$RC" ]; then break; fi
  RC=$rc
  [ "$SIGNALS" != "$before" ] || break
done
if [ -e "$HGRN_REQUEUE_MARKER" ]; then
  echo "[local] stopped cleanly with a checkpoint (exit 75); run the same command again to resume"
  exit 75
fi
exit "$RC"
