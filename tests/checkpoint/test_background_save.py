"""A background save writes the state of the step it was taken at, although training goes on (and changes every
parameter and optimizer tensor in place) before the writer thread writes a byte; a later save reuses the host
buffers of the earlier one and still writes its own step's state."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from hgrn_megatron.testing.distributed import run_distributed
from tests.pretrain.conftest import tiny_run_tree

pytestmark = [pytest.mark.distributed]

VOCAB = 512


def _train_step(engine) -> None:
    tokens = torch.randint(0, VOCAB, (1, 33))  # draws from the global RNG: the saved RNG state must be the old one
    engine.backward(engine(tokens[:, :-1], labels=tokens[:, 1:]).float().mean())
    engine.step()


def _held_writer(writer) -> threading.Event:
    """Make `writer` (a background HashingCheckpointEngine) wait for the returned event before each write."""
    release, write = threading.Event(), writer._write

    def held(*args):
        release.wait()
        write(*args)

    writer._write = held
    return release


def _save_in_background_while_training(root: str) -> dict:
    from hgrn_megatron.pretrain.checkpoint import Checkpointer, RetentionPolicy
    from hgrn_megatron.pretrain.config import RunConfig
    from hgrn_megatron.pretrain.distributed import init_model_parallel
    from hgrn_megatron.pretrain.engine import build_engine

    init_model_parallel(1)
    cfg = RunConfig.build(tiny_run_tree(Path(root) / "run", train={"global_batch_size": 1}))
    engine = build_engine(cfg, VOCAB, dp_size=1)
    _train_step(engine)  # the AdamW state exists
    keep = RetentionPolicy(keep_last=5)
    sync = Checkpointer(engine, Path(root) / "sync", keep)
    background = Checkpointer(engine, Path(root) / "background", keep, background=True)
    moved = []
    for step in (1, 2):
        run_state = {"vocab_size": VOCAB, "step": step}
        sync.save(step, run_state, {"position": torch.tensor([step])}, "a: 1\n")
        release = _held_writer(background.writer)
        before = [p.detach().clone() for p in engine.module.parameters()]
        background.save(step, run_state, {"position": torch.tensor([step])}, "a: 1\n")
        for _ in range(2):
            _train_step(engine)
        moved.append(sum(not torch.equal(a, p) for a, p in zip(before, engine.module.parameters())))
        release.set()
        assert background.finish() == step
    return {"moved": moved, "buffer_bytes": background.writer._snapshot.nbytes()}


def _same(a, b, where: str) -> None:
    assert type(a) is type(b), where
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert str(a) == str(b), where  # numpy RNG arrays and plain values alike


def test_background_save_writes_the_state_of_its_step_while_training_goes_on(tmp_path):
    out = run_distributed(_save_in_background_while_training, world_size=1, args=(str(tmp_path),), timeout=300)[0]
    n_params = out["moved"][0]
    assert n_params > 10 and out["moved"] == [n_params, n_params]  # the steps changed every tensor before the write
    assert out["buffer_bytes"] > 0
    for step in ("step-00000001", "step-00000002"):
        sync, background = tmp_path / "sync" / step, tmp_path / "background" / step
        names = sorted(p.relative_to(sync).as_posix() for p in sync.rglob("*") if p.is_file())
        assert names == sorted(p.relative_to(background).as_posix() for p in background.rglob("*") if p.is_file())
        for name in names:
            if name.endswith(".pt"):
                _same(torch.load(sync / name, weights_only=False), torch.load(background / name, weights_only=False),
                      f"{step}/{name}")
            elif name != "manifest.json":
                assert (sync / name).read_bytes() == (background / name).read_bytes(), name
