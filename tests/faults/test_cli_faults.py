"""The command-line tools at the edges: output into a pipe whose reader has gone (`hgrn-model info | head`),
a deprecation notice from a dependency printed once per rank, and Ctrl-C under launch/local.sh."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hgrn_megatron.pretrain import EXIT_REQUEUE
from hgrn_megatron.testing.distributed import free_port

from .harness import ASSETS, REPO, Trainer, latest_checkpoint, tiny_config

pytestmark = pytest.mark.faults
BIN = Path(sys.prefix) / "bin"


def _into_a_closed_pipe(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run `cmd` with stdout a pipe nobody reads any more: every write fails with EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(cmd, stdout=write_end, stderr=subprocess.PIPE, text=True, check=False, timeout=120)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("args", [
    ["hgrn-model", "info", "--preset", "hgrn-1b"],
    ["hgrn-pretrain", "--config", "CONFIG", "--print-config"],
    ["hgrn-tokenizer", "info", str(ASSETS / "tokenizer")],
    ["hgrn-data", "inspect", str(ASSETS / "pile-mini" / "val.jsonl.zst"), "--quiet"],
])
def test_every_console_script_ends_quietly_when_its_reader_is_gone(tmp_path, args):
    args = [str(tiny_config(tmp_path)) if a == "CONFIG" else a for a in args]
    result = _into_a_closed_pipe([str(BIN / args[0]), *args[1:]])
    assert result.returncode == 141, result.stderr  # as a program killed by SIGPIPE reports
    assert result.stderr == ""


def test_the_all_gather_deprecation_of_torch_is_not_printed(tmp_path):
    """DeepSpeed's ZeRO calls torch.distributed.all_gather_into_tensor, which torch 2.13 deprecates with a
    FutureWarning that every rank printed once; the project's warning filters silence it."""
    script = textwrap.dedent(f"""
        from hgrn_megatron.runtime_env import configure_environment
        configure_environment()
        import torch, torch.distributed as dist
        dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:{free_port()}")
        out = torch.zeros(2)
        dist.all_gather_into_tensor(out, torch.ones(2))
        assert out.tolist() == [1.0, 1.0]
        print("gathered")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0 and "gathered" in result.stdout, result.stderr
    assert "FutureWarning" not in result.stderr and "all_gather_into_tensor" not in result.stderr


def test_ctrl_c_under_local_sh_is_a_clean_stop_reported_as_an_interrupt(tmp_path):
    config = tiny_config(tmp_path)
    env = {"NPROC": "1", "HGRN_VENV": sys.prefix, "CUDA_VISIBLE_DEVICES": ""}
    run = Trainer(["bash", str(REPO / "launch" / "local.sh"), str(config)], env=env)
    run.wait_for("step       2/")
    run.proc.send_signal(signal.SIGINT)  # what the terminal sends to the foreground script
    assert run.finish() == EXIT_REQUEUE, run.output
    assert "stopping at step" in run.output and "to be requeued: interrupted (SIGINT)" in run.output
    assert "received SIGUSR1" not in run.output
    assert "ChildFailedError" not in run.output and "Traceback" not in run.output
    assert "[local] stopped cleanly with a checkpoint (exit 75)" in run.output
    assert latest_checkpoint(config) is not None
