"""Activation recompute (megatron-core's full recompute, through `ModelConfig.recompute_*`): the same loss and
gradients as keeping every activation, with a fraction of the saved activations."""
import pytest
import torch

from hgrn_megatron.config import ModelConfig
from hgrn_megatron.testing.distributed import run_distributed
from hgrn_megatron.testing.memory import saved_tensor_bytes
from tests.model.model_harness import batch, build, grads_of, init_model_parallel, tiny_config

pytestmark = pytest.mark.distributed

RECOMPUTE = {
    "none": {},
    "uniform-1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "uniform-2": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    "block-1": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
}


def _loss_grads_and_saved_bytes(cfgs):
    init_model_parallel()
    tokens, labels, doc_start = batch(b=2, s=48, doc_starts=(0, 20))
    out = []
    for cfg in cfgs:
        model = build(cfg)
        model.train()
        loss, saved = saved_tensor_bytes(lambda: model(tokens, labels=labels, doc_start=doc_start).mean(),
                                         model.parameters())
        loss.backward()
        out.append({"loss": loss.detach(), "grads": grads_of(model), "saved": saved})
    return out


@pytest.mark.parametrize("mixer", ["hgrn", "attention"])
def test_recompute_gives_the_same_gradients_with_fewer_saved_activations(mixer):
    cfgs = [tiny_config(mixer=mixer, num_layers=4, reset_at_document_boundary=True, **RECOMPUTE[name])
            for name in RECOMPUTE]
    results = dict(zip(RECOMPUTE, run_distributed(_loss_grads_and_saved_bytes, world_size=1, args=(cfgs,),
                                                  timeout=180)[0]))
    ref = results["none"]
    for name, r in results.items():
        assert torch.equal(r["loss"], ref["loss"]), name  # the same ops on the same inputs, again
        for param, grad in ref["grads"].items():
            assert torch.equal(r["grads"][param], grad), (name, param)
    saved = {name: r["saved"] / ref["saved"] for name, r in results.items()}
    # Uniform recompute keeps one layer input per group (plus the embedding and head's own activations);
    # block-1 recomputes only the first of the four layers.
    assert saved["uniform-1"] < 0.5 and saved["uniform-2"] < saved["uniform-1"], saved
    assert 0.6 < saved["block-1"] < 0.95, saved


def test_recompute_layers_must_fit_the_model():
    with pytest.raises(ValueError, match=r"recompute_num_layers \(9\) exceeds num_layers \(4\)"):
        ModelConfig.build({"preset": "tiny", "num_layers": 4, "recompute_granularity": "full",
                           "recompute_num_layers": 9})
    with pytest.raises(ValueError, match=r"'uniform' needs recompute_num_layers \(3\) to divide num_layers \(4\)"):
        ModelConfig.build({"preset": "tiny", "num_layers": 4, "recompute_granularity": "full",
                           "recompute_method": "uniform", "recompute_num_layers": 3})
    ModelConfig.build({"preset": "tiny", "num_layers": 4, "recompute_granularity": "full",  # block: any count
                       "recompute_method": "block", "recompute_num_layers": 3})
