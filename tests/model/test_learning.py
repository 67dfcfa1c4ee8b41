"""The tiny model learns: on one fixed small batch, the loss falls well below its initial value.

A smoke test of the whole forward/backward path (gates, scan, norms, lower bounds, θ), not a benchmark.
"""
import pytest
import torch

from hgrn_megatron.testing.distributed import run_distributed
from tests.model.model_harness import build, init_model_parallel, tiny_config, train_steps

pytestmark = pytest.mark.distributed

STEPS = 40


def _train_on_one_batch(cfg):
    init_model_parallel()
    model = build(cfg, seed=0)
    losses = train_steps(model, STEPS)
    theta = model.decoder.layers[1].self_attention.theta
    moved = {"theta": (theta - build(cfg, seed=0).decoder.layers[1].self_attention.theta).abs().max().item(),
             "lower_bounds": model.lower_bounds.table.abs().max().item()}
    return losses, moved


def test_tiny_model_fits_a_fixed_batch():
    cfg = tiny_config(reset_at_document_boundary=True)
    losses, moved = run_distributed(_train_on_one_batch, world_size=1, args=(cfg,), timeout=180)[0]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], f"loss went {losses[0]:.3f} -> {losses[-1]:.3f} in {STEPS} steps"
    # The HGRN-specific parameters are trained too.
    assert moved["theta"] > 0 and moved["lower_bounds"] > 0
