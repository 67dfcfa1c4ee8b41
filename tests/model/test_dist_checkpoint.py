"""megatron dist-checkpointing of the model's `sharded_state_dict`: saved at TP = 2, loaded at TP = 1, saved
again and loaded at TP = 2, with equal logits at every stage. Every custom HGRU tensor (θ, the mixer norm,
the lower-bound table) must declare its TP axis for this to work.
"""
import multiprocessing

import pytest
import torch

from hgrn_megatron.testing.distributed import run_distributed
from tests.model.model_harness import batch, build, init_model_parallel, max_rel_diff, tiny_config

pytestmark = pytest.mark.distributed


def _stage(cfg, seed, load_dir, save_dir):
    """Build (seeded), optionally load a dist checkpoint, compute logits, optionally save one."""
    from megatron.core import dist_checkpointing

    if not torch.cuda.is_available():
        # megatron's checkpoint writer broadcasts a failure flag held on torch.cuda.current_device(); on a
        # CPU-only machine the CPU is that device (this rank is a forked process: the patch ends with it).
        torch.cuda.current_device = lambda: "cpu"
    init_model_parallel()
    model = build(cfg, seed=seed)
    if load_dir is not None:
        loaded = dist_checkpointing.load(model.sharded_state_dict(), load_dir)
        model.load_state_dict(loaded)
    ids, _, doc_start = batch()
    with torch.no_grad():
        logits = model(ids, doc_start=doc_start)
    if save_dir is not None:
        # The torch_dist writer starts helper processes, which a daemonic process (as run_distributed starts
        # ranks) may not; this rank waits for them, so it can safely stop being daemonic.
        multiprocessing.current_process().daemon = False
        dist_checkpointing.save(model.sharded_state_dict(), save_dir)
    return logits


def test_sharded_checkpoint_tp2_to_tp1_and_back(tmp_path):
    # Complex variant with biases and LayerNorm: θ, mixer norm weight and bias, lower bounds, GLU fc1 all split.
    cfg = tiny_config(variant="complex", reset_at_document_boundary=True, add_bias_linear=True)
    first, second = tmp_path / "saved_at_tp2", tmp_path / "saved_at_tp1"
    first.mkdir(), second.mkdir()

    tp2 = run_distributed(_stage, world_size=2, args=(cfg, 0, None, str(first)), timeout=120)
    original = torch.cat(tp2, dim=-1)
    # Different seeds: equality below can only come from the checkpoint.
    tp1 = run_distributed(_stage, world_size=1, args=(cfg, 1, str(first), str(second)), timeout=120)[0]
    assert max_rel_diff(tp1, original) < 2e-5
    fresh = run_distributed(_stage, world_size=1, args=(cfg, 1, None, None), timeout=120)[0]
    assert max_rel_diff(fresh, original) > 1e-2  # the seed alone would not have matched

    back = run_distributed(_stage, world_size=2, args=(cfg, 2, str(second), None), timeout=120)
    assert max_rel_diff(torch.cat(back, dim=-1), original) < 2e-5
