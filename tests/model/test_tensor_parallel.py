"""TP = 2 computes what TP = 1 computes: logits, loss and every gradient, with the same weights.

The TP = 2 ranks load the TP = 1 weights split by `tp_rules`, so these tests also check the partition table
against the layout megatron and the HGRU actually use.
"""
import pytest
import torch

from hgrn_megatron.testing.distributed import run_distributed
from hgrn_megatron.tp_rules import merge_state_dicts, split_state_dict
from tests.model.model_harness import (
    VOCAB,
    batch,
    build,
    grads_of,
    init_model_parallel,
    max_rel_diff,
    tensors_of,
    tiny_config,
)

pytestmark = pytest.mark.distributed

FP32_ROUNDING = 2e-5  # relative to each tensor's largest entry

VARIANTS = {
    # complex, LayerNorm mixer norm, output gate, lower bounds, document resets, untied head, biases
    "complex": dict(variant="complex", reset_at_document_boundary=True, add_bias_linear=True),
    # real with expansion, RMSNorm mixer norm, no output gate, tied embeddings, layernorm blocks
    "real": dict(variant="real", expand_ratio=2, mixer_norm="rmsnorm", output_gate=False, norm="layernorm",
                 share_embeddings_and_output_weights=True),
    "attention": dict(mixer="attention", reset_at_document_boundary=True),
}


def _forward_backward(cfg, full_state, identity_norm_backward=False):
    """Logits, per-token loss and gradients on this rank; loads `full_state` split for this rank if given."""
    rank = init_model_parallel()
    if identity_norm_backward:
        # What megatron's reduce_from_tensor_model_parallel_region does: a sum forward, identity backward.
        from hgrn_megatron import hgru_ops

        hgru_ops._sum_backward_statistics = lambda stats, group: stats
    model = build(cfg, seed=0)
    initial_state = tensors_of(model.state_dict())
    if full_state is not None:
        tp = torch.distributed.get_world_size()
        result = model.load_state_dict(split_state_dict(full_state, tp, rank), strict=False)
        assert not result.unexpected_keys and all(k.endswith("_extra_state") for k in result.missing_keys), result
    ids, labels, doc_start = batch()
    logits = model(ids, doc_start=doc_start)
    loss = model(ids, labels=labels, doc_start=doc_start)
    # A weighted sum, so every position's gradient differs.
    weights = torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)
    (loss * weights).sum().backward()
    return {"logits": logits.detach(), "loss": loss.detach(), "initial_state": initial_state,
            "state": tensors_of(model.state_dict()), "grads": grads_of(model)}


def _run_tp1_and_tp2(cfg, identity_norm_backward=False):
    tp1 = run_distributed(_forward_backward, world_size=1, args=(cfg, None), timeout=120)[0]
    tp2 = run_distributed(_forward_backward, world_size=2, args=(cfg, tp1["state"], identity_norm_backward),
                          timeout=120)
    return tp1, tp2


@pytest.mark.parametrize("name", list(VARIANTS))
def test_tp2_matches_tp1(name):
    cfg = tiny_config(**VARIANTS[name])
    tp1, tp2 = _run_tp1_and_tp2(cfg)

    # The same seed gives the same full model at TP = 2 (megatron's CPU initialisation builds each full
    # matrix, then splits it; θ and the norms are split the same way), and merging recovers TP = 1.
    for states in ([r["initial_state"] for r in tp2], [r["state"] for r in tp2]):
        merged_state = merge_state_dicts(states)
        assert merged_state.keys() == tp1["state"].keys()
        for key, value in tp1["state"].items():
            assert torch.equal(merged_state[key], value), key

    logits = torch.cat([r["logits"] for r in tp2], dim=-1)  # vocab-parallel logits
    assert logits.shape == tp1["logits"].shape == (2, 24, VOCAB)
    assert max_rel_diff(logits, tp1["logits"]) < FP32_ROUNDING
    for r in tp2:
        assert max_rel_diff(r["loss"], tp1["loss"]) < FP32_ROUNDING

    merged_grads = merge_state_dicts([r["grads"] for r in tp2], replicated_atol=1e-7)
    assert merged_grads.keys() == tp1["grads"].keys()
    for key, grad in tp1["grads"].items():
        assert grad.abs().max() > 0, f"{key}: zero gradient at TP = 1 (the comparison would prove nothing)"
        assert max_rel_diff(merged_grads[key], grad) < FP32_ROUNDING, key
    if name == "complex":
        names = set(tp1["grads"])
        assert {"lower_bounds.table", "embedding.word_embeddings.weight", "output_layer.weight",
                "decoder.layers.1.self_attention.theta", "decoder.layers.1.self_attention.norm.weight"} <= names


def test_identity_backward_of_the_norm_statistics_gives_wrong_gradients():
    """The comparison above detects the classic mistake: all-reducing the norm statistics forward only."""
    cfg = tiny_config(**VARIANTS["complex"])
    tp1, tp2 = _run_tp1_and_tp2(cfg, identity_norm_backward=True)
    logits = torch.cat([r["logits"] for r in tp2], dim=-1)
    assert max_rel_diff(logits, tp1["logits"]) < FP32_ROUNDING  # the forward is still right ...
    merged = merge_state_dicts([r["grads"] for r in tp2], replicated_atol=float("inf"))
    worst = max(max_rel_diff(merged[k], g) for k, g in tp1["grads"].items())
    assert worst > 1e-2  # ... the gradients are not
