"""TP = 2 computes what TP = 1 computes: logits, loss and every gradient, with the same weights.

The TP = 2 ranks load the TP = 1 weights split by `tp_rules`, so these tests also check the partition table
against the layout megatron and the HGRU actually use.
"""
import pytest
import torch

from hgrn_megatron.testing.distributed import run_distributed
from hgrn_megatron.tp_rules import merge_state_dicts
from tests.model.model_harness import (
    FP32_ROUNDING,
    VOCAB,
    assert_tp2_matches_tp1,
    init_model_parallel,
    max_rel_diff,
    run_tp1_and_tp2,
    tiny_config,
)

pytestmark = pytest.mark.distributed

VARIANTS = {
    # complex, LayerNorm mixer norm, output gate, lower bounds, document resets, untied head, biases
    "complex": dict(variant="complex", reset_at_document_boundary=True, add_bias_linear=True),
    # real with expansion, RMSNorm mixer norm, no output gate, tied embeddings, layernorm blocks
    "real": dict(variant="real", expand_ratio=2, mixer_norm="rmsnorm", output_gate=False, norm="layernorm",
                 share_embeddings_and_output_weights=True),
    "attention": dict(mixer="attention", reset_at_document_boundary=True),
    # the paper's §3.2 form: sigmoid gate before a LayerNorm, biases on the mixer projections only
    "paper": dict(form="paper"),
    # each switch alone, on the real variant with RMSNorm: sigmoid gate after the norm, mixer biases
    "real-sigmoid-gate-mixer-bias": dict(variant="real", mixer_norm="rmsnorm", output_gate_activation="sigmoid",
                                         mixer_bias=True),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_tp2_matches_tp1(name):
    cfg = tiny_config(**VARIANTS[name])
    tp1, tp2 = run_tp1_and_tp2(cfg)
    assert_tp2_matches_tp1(tp1, tp2)
    if name == "complex":
        names = set(tp1["grads"])
        assert {"lower_bounds.table", "embedding.word_embeddings.weight", "output_layer.weight",
                "decoder.layers.1.self_attention.theta", "decoder.layers.1.self_attention.norm.weight"} <= names


def test_identity_backward_of_the_norm_statistics_gives_wrong_gradients():
    """The comparison above detects the classic mistake: all-reducing the norm statistics forward only."""
    cfg = tiny_config(**VARIANTS["complex"])
    tp1, tp2 = run_tp1_and_tp2(cfg, identity_norm_backward=True)
    logits = torch.cat([r["logits"] for r in tp2], dim=-1)
    assert max_rel_diff(logits, tp1["logits"]) < FP32_ROUNDING  # the forward is still right ...
    merged = merge_state_dicts([r["grads"] for r in tp2], replicated_atol=float("inf"))
    worst = max(max_rel_diff(merged[k], g) for k, g in tp1["grads"].items())
    assert worst > 1e-2  # ... the gradients are not


def _tp_attributes(initialize: bool):
    from hgrn_megatron.model import build_model

    init_model_parallel()
    model = build_model(tiny_config(add_bias_linear=True), VOCAB, initialize=initialize)
    return {name: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", -1),
                   getattr(p, "partition_stride", 1)) for name, p in model.named_parameters()}


def test_a_model_built_without_initialisation_keeps_its_tensor_parallel_attributes():
    """A resume builds the model without megatron's initialisation, which is where megatron marks split weights;
    unmarked, they would count as replicated in the gradient norm at TP 2."""
    with_init, without = run_distributed(_tp_attributes, world_size=2, args=(True,))[0], run_distributed(
        _tp_attributes, world_size=2, args=(False,))[0]
    assert with_init == without and sum(split for split, _, _ in with_init.values()) >= 8
