"""Megatron sequence parallelism: TP = 2 with `sequence_parallel` computes what TP = 1 computes (logits, loss and
every gradient, document resets included), and each TP rank then saves half of TP = 1's activations instead of
keeping the norm inputs and residual stream whole."""
import pytest
import torch

from hgrn_megatron.testing.distributed import DistributedTestError, run_distributed
from tests.model.model_harness import (
    FP32_ROUNDING,
    VOCAB,
    assert_tp2_matches_tp1,
    batch,
    forward_backward,
    grads_of,
    max_rel_diff,
    tensors_of,
    tiny_config,
)

pytestmark = pytest.mark.distributed

VARIANTS = {
    # complex, document resets, biases everywhere (the row-parallel biases are sequence-parallel parameters)
    "complex": dict(variant="complex", reset_at_document_boundary=True, add_bias_linear=True),
    # real with expansion, no output gate, tied embeddings, LayerNorm blocks, activation recompute
    "real-recompute": dict(variant="real", expand_ratio=2, mixer_norm="rmsnorm", output_gate=False,
                           norm="layernorm", share_embeddings_and_output_weights=True, reset_at_document_boundary=True,
                           recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    # the paper's form (mixer biases) with the chunked loss, which gathers the sequence itself
    "paper-chunked-loss": dict(form="paper", reset_at_document_boundary=True, loss_chunk_tokens=16),
    "attention": dict(mixer="attention", reset_at_document_boundary=True),
}


def _sp_forward_backward(cfg, full_state, tp: int = 2, cp: int = 1):
    """Rank function: what `model_harness.forward_backward` returns, at TP x CP with sequence parallelism; the
    batch is cut into this rank's CP piece, gradients are summed over CP (what DP x CP averaging does)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from hgrn_megatron.context_parallel import sequence_piece
    from hgrn_megatron.model import build_model
    from hgrn_megatron.tp_rules import split_state_dict

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    rank = parallel_state.get_tensor_model_parallel_rank()
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB, sequence_parallel=True)
    assert model.config.sequence_parallel
    initial_state = tensors_of(model.state_dict())
    result = model.load_state_dict(split_state_dict(full_state, tp, rank), strict=False)
    assert not result.unexpected_keys and all(k.endswith("_extra_state") for k in result.missing_keys), result
    group = parallel_state.get_context_parallel_group()
    ids, labels, doc_start = (sequence_piece(t, group) for t in batch())
    logits = model(ids, doc_start=doc_start)
    loss = model(ids, labels=labels, doc_start=doc_start)
    weights = sequence_piece(torch.linspace(0.5, 1.5, 2 * 24).view(2, 24), group)
    (loss * weights).sum().backward()
    grads = grads_of(model)
    for g in grads.values():
        dist.all_reduce(g, group=group)
    return {"logits": logits.detach(), "loss": loss.detach(), "initial_state": initial_state,
            "state": tensors_of(model.state_dict()), "grads": grads, "tp_rank": rank,
            "cp_rank": parallel_state.get_context_parallel_rank()}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_tp2_with_sequence_parallelism_matches_tp1(name):
    cfg = tiny_config(**VARIANTS[name])
    tp1 = run_distributed(forward_backward, world_size=1, args=(cfg, None), timeout=120)[0]
    tp2 = run_distributed(_sp_forward_backward, world_size=2, args=(cfg, tp1["state"]), timeout=120)
    # The block norms' gradients come from each rank's half of the sequence: summed over TP, equal on both.
    norm = "decoder.layers.0.pre_mlp_layernorm.weight"
    assert torch.equal(tp2[0]["grads"][norm], tp2[1]["grads"][norm])
    assert_tp2_matches_tp1(tp1, tp2)


def _merge_cp(ranks, key, dim):
    ordered = sorted(ranks, key=lambda r: r["cp_rank"])
    return torch.cat([r[key] for r in ordered], dim=dim)


def test_tp2_cp2_with_sequence_parallelism_matches_tp1_cp1():
    """Sequence parallelism inside each CP piece: 4 ranks, the HGRU gathers its piece over TP, then passes the
    recurrent state over CP."""
    from hgrn_megatron.tp_rules import merge_state_dicts

    cfg = tiny_config(**VARIANTS["complex"])
    ref = run_distributed(forward_backward, world_size=1, args=(cfg, None), timeout=120)[0]
    ranks = run_distributed(_sp_forward_backward, world_size=4, args=(cfg, ref["state"], 2, 2), timeout=240)
    tp0, tp1 = ([r for r in ranks if r["tp_rank"] == t] for t in (0, 1))
    logits = torch.cat([_merge_cp(tp0, "logits", 1), _merge_cp(tp1, "logits", 1)], dim=-1)
    assert max_rel_diff(logits, ref["logits"]) < FP32_ROUNDING
    assert max_rel_diff(_merge_cp(tp0, "loss", 1), ref["loss"]) < FP32_ROUNDING
    merged = merge_state_dicts([tp0[0]["grads"], tp1[0]["grads"]], replicated_atol=1e-7)
    for key, grad in ref["grads"].items():
        assert max_rel_diff(merged[key], grad) < FP32_ROUNDING, key


# ------------------------------------------------------------------------------------------ activation memory
def _saved_bytes(cfg, sequence_parallel: bool, seq: int):
    """Rank function: bytes autograd saves for one forward pass of this rank (loss with labels)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from hgrn_megatron.model import build_model
    from hgrn_megatron.testing.memory import saved_tensor_bytes

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB, sequence_parallel=sequence_parallel)
    ids, labels, doc_start = batch(b=1, s=seq, doc_starts=(0, seq // 2))
    _, saved = saved_tensor_bytes(lambda: model(ids, labels=labels, doc_start=doc_start), model.parameters())
    return saved


def test_sequence_parallelism_halves_the_saved_activations_per_rank():
    """At TP 2 without SP each rank keeps the replicated share (norm inputs, the linears' inputs) whole; with SP
    every saved tensor is split, so a rank saves half of what the one TP 1 rank saves."""
    cfg = tiny_config(reset_at_document_boundary=True, hidden_size=128, ffn_hidden_size=256, num_layers=2)
    seq = 256
    tp1 = run_distributed(_saved_bytes, world_size=1, args=(cfg, False, seq), timeout=120)[0]
    tp2 = run_distributed(_saved_bytes, world_size=2, args=(cfg, False, seq), timeout=120)
    sp2 = run_distributed(_saved_bytes, world_size=2, args=(cfg, True, seq), timeout=120)
    assert tp2[0] == tp2[1] and sp2[0] == sp2[1]
    replicated = 2 * tp2[0] - tp1  # tp2 = replicated + split / 2, tp1 = replicated + split
    assert replicated > 0.1 * tp1  # there is a replicated share to remove
    assert sp2[0] == pytest.approx(tp1 / 2, rel=0.01)
    assert tp2[0] - sp2[0] == pytest.approx(replicated / 2, rel=0.02)


# ------------------------------------------------------------------------------------------ refusals
def _odd_length():
    from megatron.core import parallel_state

    from hgrn_megatron.model import build_model

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    model = build_model(tiny_config(), VOCAB, sequence_parallel=True)
    ids, labels, _ = batch(s=23)
    model(ids, labels=labels)


def test_a_sequence_that_does_not_split_over_tp_is_refused():
    with pytest.raises(DistributedTestError, match=r"sequence length \(23\) must be divisible by the "
                                                   r"tensor-parallel size \(2\)"):
        run_distributed(_odd_length, world_size=2, timeout=120)


def _tp1_config():
    from megatron.core import parallel_state

    from hgrn_megatron.model import build_model

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    return build_model(tiny_config(), VOCAB, sequence_parallel=True).config.sequence_parallel


def test_sequence_parallelism_is_a_no_op_at_tp1():
    assert run_distributed(_tp1_config, world_size=1, timeout=120) == [False]
