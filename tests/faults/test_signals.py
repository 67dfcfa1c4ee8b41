"""Stop signals at the awkward moments, sent to real `hgrn-pretrain` processes: during the start-up imports
(directly, and under launch/slurm/worker.sh, which starts the trainer with them ignored), as Ctrl-C, in a burst
during the save, and during the interpreter's shutdown. Each must end in a checkpoint and exit 75, except a
second Ctrl-C, which aborts at once."""
from __future__ import annotations

import signal
import sys
import time

import pytest

from hgrn_megatron.pretrain import EXIT_REQUEUE

from .harness import HGRN_PRETRAIN, WORKER_SH, Trainer, child_pid, latest_checkpoint, tiny_config

pytestmark = pytest.mark.faults


def test_term_during_the_start_up_imports_stops_at_the_first_step_with_a_checkpoint(tmp_path):
    config = tiny_config(tmp_path)
    run = Trainer([HGRN_PRETRAIN, "--config", str(config)])
    run.signal_at(0.3, signal.SIGTERM)  # the console script is still importing torch and DeepSpeed
    assert run.finish() == EXIT_REQUEUE, run.output
    assert "stopping at step 1 to be requeued: received SIGTERM" in run.output, run.output
    assert latest_checkpoint(config) == "step-00000001"


def test_usr1_and_term_during_the_imports_under_the_worker_script_are_kept(tmp_path):
    """worker.sh ignores USR1 and TERM (SLURM signals the wrappers too) and the trainer inherits that: a signal
    before its handlers exist would vanish. USR1 at ~2 s is the stop request the log reports."""
    config = tiny_config(tmp_path)
    run = Trainer(["bash", str(WORKER_SH), sys.executable, "-m", "hgrn_megatron.pretrain", "--config", str(config)])
    trainer = child_pid(run.proc.pid)
    for at, sig in ((2.0, signal.SIGUSR1), (3.0, signal.SIGTERM)):
        run.signal_at(at, sig, pid=run.proc.pid)  # as SLURM does: the wrapper and the trainer
        run.signal_at(at, sig, pid=trainer)
    assert run.finish() == EXIT_REQUEUE, run.output
    assert "stopping at step 1 to be requeued: received SIGUSR1" in run.output, run.output
    assert latest_checkpoint(config) == "step-00000001"


def test_ctrl_c_checkpoints_and_exits_75(tmp_path):
    config = tiny_config(tmp_path)
    run = Trainer([HGRN_PRETRAIN, "--config", str(config)])
    run.wait_for("step       3/")
    run.proc.send_signal(signal.SIGINT)
    assert run.finish() == EXIT_REQUEUE, run.output
    assert "to be requeued: interrupted (SIGINT)" in run.output
    assert "Traceback" not in run.output and "KeyboardInterrupt" not in run.output
    assert latest_checkpoint(config) is not None


def test_a_second_ctrl_c_aborts_at_once_without_a_checkpoint(tmp_path):
    config = tiny_config(tmp_path)
    run = Trainer([HGRN_PRETRAIN, "--config", str(config)])
    run.signal_at(0.5, signal.SIGINT)  # during the imports
    run.signal_at(2.0, signal.SIGINT)
    started = time.monotonic()
    rc = run.finish(timeout=30)
    assert rc == -signal.SIGINT, run.output  # died of SIGINT: a shell reports 130
    assert time.monotonic() - started < 3, "the second interrupt must not wait for the start-up to finish"
    assert "interrupted (SIGINT): stopping with a checkpoint at the next step boundary" in run.output
    assert "Traceback" not in run.output
    assert latest_checkpoint(config) is None


def _signal_until_exit(run: Trainer, signals: list[int], spacing: float) -> None:
    """Send `signals` in turn, every `spacing` s, until the process has exited (a real notice may repeat)."""
    i = 0
    while run.proc.poll() is None:
        try:
            run.proc.send_signal(signals[i % len(signals)])
        except ProcessLookupError:
            break
        i += 1
        time.sleep(spacing)


def test_signals_during_the_shutdown_keep_the_requeue_code(tmp_path):
    """After 'exit 75' is logged, TERM and USR1 keep arriving through the teardown and the interpreter's
    shutdown (where Python gives its handlers back to the default action, death)."""
    config = tiny_config(tmp_path)
    run = Trainer([HGRN_PRETRAIN, "--config", str(config)])
    run.wait_for("step       2/")
    run.proc.send_signal(signal.SIGUSR1)
    run.wait_for("exit 75:")
    _signal_until_exit(run, [signal.SIGTERM, signal.SIGUSR1], spacing=0.002)
    assert run.finish() == EXIT_REQUEUE, run.output
    assert latest_checkpoint(config) is not None


def test_a_burst_of_seven_signals_during_the_save_ends_in_75(tmp_path):
    config = tiny_config(tmp_path)
    run = Trainer([HGRN_PRETRAIN, "--config", str(config)])
    run.wait_for("step       2/")
    for i in range(7):  # the first asks for the stop; the rest land in the save and the shutdown
        if run.proc.poll() is not None:
            break
        run.proc.send_signal((signal.SIGUSR1, signal.SIGTERM)[i % 2])
        time.sleep(0.05)
    assert run.finish() == EXIT_REQUEUE, run.output
    stopped = latest_checkpoint(config)
    assert stopped is not None and f"stopping at step {int(stopped.split('-')[1])} to be requeued" in run.output
