"""The universal conversion (`hgrn-checkpoint reshard`) writes, with any number of worker processes, the files
DeepSpeed's own converter (`ds_to_universal`) writes for the same checkpoint, byte for byte: at DP 2 and at TP 2
(ZeRO 1 and 2), each conversion in a fresh process as the trainer runs it."""
from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hgrn_megatron.testing.distributed import run_distributed
from tests.pretrain.conftest import tiny_run_tree

pytestmark = [pytest.mark.distributed]

VOCAB = 512


def _save_one_step(root: str, tp: int, zero_stage: int) -> None:
    from hgrn_megatron.pretrain.checkpoint import RetentionPolicy, save_checkpoint
    from hgrn_megatron.pretrain.config import RunConfig
    from hgrn_megatron.pretrain.distributed import init_model_parallel
    from hgrn_megatron.pretrain.engine import build_engine

    init_model_parallel(tp)
    cfg = RunConfig.build(tiny_run_tree(Path(root) / "run", train={"global_batch_size": 2 // tp},
                                        parallel={"tensor_parallel_size": tp, "zero_stage": zero_stage}))
    engine = build_engine(cfg, VOCAB, dp_size=2 // tp)
    torch.manual_seed(1)  # the same batch on every rank
    tokens = torch.randint(0, VOCAB, (1, 33))
    engine.backward(engine(tokens[:, :-1], labels=tokens[:, 1:]).float().mean())
    engine.step()
    save_checkpoint(engine, Path(root), 1, {"vocab_size": VOCAB, "step": 1}, {}, "a: 1\n",
                    RetentionPolicy(keep_last=1))


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _reshard(ckpt: Path, workers: int, keep_as: Path) -> None:
    cli = [sys.executable, "-m", "hgrn_megatron.pretrain.checkpoint.reshard", "reshard", str(ckpt),
           "--workers", str(workers)]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    shutil.move(ckpt / "ds_universal", keep_as)


@pytest.mark.parametrize("tp,zero_stage", [(1, 2), (2, 1)], ids=["dp2-zero2", "tp2-zero1"])
def test_parallel_conversion_writes_what_deepspeeds_converter_writes(tmp_path, tp, zero_stage, monkeypatch):
    from hgrn_megatron.pretrain.checkpoint import universal

    run_distributed(_save_one_step, world_size=2, args=(str(tmp_path), tp, zero_stage), timeout=300)
    ckpt = tmp_path / "step-00000001"
    universal._deepspeed_converter(ckpt / "ds", tmp_path / "deepspeed", workers=1)
    reference = _files(tmp_path / "deepspeed")
    assert "zero/optimizer_state.pt" in reference and sum(f.endswith("/fp32.pt") for f in reference) > 10

    def not_this_layout(*args):
        raise AssertionError("this layout is converted by the parallel scheduler, not DeepSpeed's converter")

    with monkeypatch.context() as patch:
        patch.setattr(universal, "_deepspeed_converter", not_this_layout)
        universal.convert(ckpt / "ds", tmp_path / "workers-0", workers=1)  # here, without a pool
    for workers in (0, 1, 2):
        if workers:
            _reshard(ckpt, workers, tmp_path / f"workers-{workers}")
        assert _files(tmp_path / f"workers-{workers}") == reference
        differ = [f for f in reference
                  if not filecmp.cmp(tmp_path / "deepspeed" / f, tmp_path / f"workers-{workers}" / f, shallow=False)]
        assert not differ, (workers, differ[:5])
    assert not list(ckpt.glob("ds_universal*")) and not list(ckpt.glob("ds.universal-input"))
