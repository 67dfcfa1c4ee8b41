"""Checkpoint faults on real gloo ranks and real DeepSpeed checkpoints: same-size corruption, files that load
badly, manifests of the wrong shape, every checkpoint unusable, a disk that fills during a save, a changed model."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from hgrn_megatron.pretrain.checkpoint import MANIFEST, verify_checkpoint, write_manifest
from hgrn_megatron.testing.distributed import DistributedTestError, run_distributed
from tests.pretrain.conftest import read_losses, tiny_run_tree

pytestmark = [pytest.mark.distributed]


def _train(tree: dict, resume: str = "auto"):
    from hgrn_megatron.pretrain.config import RunConfig
    from hgrn_megatron.pretrain.trainer import train

    result = train(RunConfig.build(tree), resume=resume)
    return result.exit_code, result.step


def run(tree: dict, world_size: int = 1, resume: str = "auto"):
    return run_distributed(_train, world_size=world_size, args=(tree, resume), timeout=240)[0]


def _flip(path: Path, offset: int, length: int = 64) -> None:
    """Invert `length` bytes at `offset` (negative: from the end); the size stays the same."""
    data = bytearray(path.read_bytes())
    start = offset % len(data)
    data[start:start + length] = bytes(b ^ 0xFF for b in data[start:start + length])
    path.write_bytes(bytes(data))


def _largest_file(ckpt: Path) -> Path:
    return max((p for p in ckpt.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 6-step run: the losses every recovered run must reproduce."""
    tree = tiny_run_tree(tmp_path_factory.mktemp("straight") / "run", schedule={"decay_steps": 6})
    assert run(tree) == (0, 6)
    return read_losses(tree["run_dir"])


def _interrupted(tmp_path: Path) -> tuple[dict, Path]:
    """A run stopped at step 4 with checkpoints at steps 2 and 4."""
    tree = tiny_run_tree(tmp_path / "run", schedule={"decay_steps": 6}, train={"steps": 4},
                         checkpoint={"interval": 2, "keep_last": 3})
    assert run(tree) == (0, 4)
    tree["train"]["steps"] = 6
    return tree, Path(tree["run_dir"]) / "checkpoints"


def test_same_size_corruption_of_the_largest_file_falls_back(tmp_path, straight):
    tree, root = _interrupted(tmp_path)
    largest = _largest_file(root / "step-00000004")
    assert "optim_states" in largest.name
    _flip(largest, largest.stat().st_size // 2)
    assert "does not match its xxh3_128 digest" in verify_checkpoint(root / "step-00000004")
    assert run(tree) == (0, 6)  # resumed from step 2, not from the corrupt step 4
    assert read_losses(tree["run_dir"]) == straight
    (abandoned,) = (root / "abandoned").iterdir()  # the corrupt one is kept aside, not resumed again
    assert [p.name for p in abandoned.iterdir()] == ["step-00000004"]


def test_a_file_that_fails_to_load_falls_back(tmp_path, straight):
    """The zip directory at the end of a .pt file is damaged, and the manifest describes the damaged file (as an
    earlier version's manifest, without digests of large files, would let through): the load fails on the rank
    reading it, the ranks agree, and the previous checkpoint is used."""
    tree, root = _interrupted(tmp_path)
    model = next((root / "step-00000004" / "ds").glob("*model_states.pt"))
    _flip(model, -200, 64)
    write_manifest(root / "step-00000004")
    assert verify_checkpoint(root / "step-00000004") is None
    assert run(tree) == (0, 6)
    assert read_losses(tree["run_dir"]) == straight


@pytest.mark.parametrize("body", ["[1, 2]", '{"files": ["a"]}', '{"files": {"run_state.json": {"size": 3}}}',
                                  '{"files": {"run_state.json": {"bytes": "3"}}}', "not json"])
def test_manifests_of_the_wrong_shape_make_a_checkpoint_unusable(tmp_path, body):
    ckpt = tmp_path / "step-00000001"
    ckpt.mkdir()
    (ckpt / "run_state.json").write_text("{}")
    (ckpt / MANIFEST).write_text(body)
    problem = verify_checkpoint(ckpt)
    assert problem and "manifest" in problem


def test_every_checkpoint_unusable_is_an_error_unless_asked_to_start_afresh(tmp_path):
    tree, root = _interrupted(tmp_path)
    for step in ("step-00000002", "step-00000004"):
        _flip(_largest_file(root / step), 1000)
    with pytest.raises(DistributedTestError, match=r"2 checkpoint\(s\) exist but none is usable.*--resume none"):
        run(tree)
    metrics_before = (Path(tree["run_dir"]) / "metrics.jsonl").read_text()
    assert metrics_before.count('"split": "train"') == 4  # nothing was truncated by the refused start
    assert run(tree, resume="none") == (0, 6)
    assert sorted(p.name for p in next((root / "abandoned").iterdir()).iterdir()) == ["step-00000002",
                                                                                     "step-00000004"]


def test_a_changed_model_is_refused_naming_what_differs(tmp_path):
    tree, _ = _interrupted(tmp_path)
    tree["model"]["hidden_size"] = 128
    with pytest.raises(DistributedTestError, match=r"model\.hidden_size: saved 64, now 128"):
        run(tree)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a few MiB (CI runs as root); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_disk_that_fills_during_a_save(small_disk, tmp_path, straight):
    probe = tiny_run_tree(tmp_path / "probe", train={"steps": 2}, checkpoint={"interval": 2})
    assert run(probe) == (0, 2)
    size = sum(p.stat().st_size for p in (Path(probe["run_dir"]) / "checkpoints").rglob("*") if p.is_file())
    # Room for the first checkpoint and about half of the second.
    subprocess.run(["mount", "-o", f"remount,size={int(size * 1.6) + (256 << 10)}", str(small_disk)], check=True)
    tree = tiny_run_tree(small_disk / "run", schedule={"decay_steps": 6}, checkpoint={"interval": 2, "keep_last": 3})
    with pytest.raises(DistributedTestError, match=r"could not save the checkpoint of step 4: rank 0: No space left "
                                                   r"on device writing .* MiB free .*newest checkpoint on disk is "
                                                   r"step-00000002"):
        run(tree)
    root = small_disk / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"]  # no .tmp left behind
    assert verify_checkpoint(root / "step-00000002") is None
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space is back
    assert run(tree) == (0, 6)
    assert read_losses(tree["run_dir"]) == straight
    shutil.rmtree(small_disk / "run")


def test_a_refused_resume_at_another_size_converts_nothing_and_keeps_the_config(tmp_path):
    """Another data set-up (here the seed) at another DP size: refused, naming the difference, before the
    checkpoint is converted to the universal format or RUN_DIR/config.yaml is rewritten."""
    tree = tiny_run_tree(tmp_path / "run", train={"steps": 2})
    assert run(tree, world_size=2) == (0, 2)
    config_before = (Path(tree["run_dir"]) / "config.yaml").read_text()
    tree["data"]["seed"] = 99
    tree["train"]["steps"] = 3
    with pytest.raises(DistributedTestError, match=r"seed: saved 1234, now 99"):
        run(tree, world_size=1)
    step = Path(tree["run_dir"]) / "checkpoints" / "step-00000002"
    assert not (step / "ds_universal").exists() and not list(step.glob("ds_universal*"))
    assert (Path(tree["run_dir"]) / "config.yaml").read_text() == config_before
