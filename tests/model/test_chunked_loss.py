"""Chunked cross-entropy equals megatron's output layer + vocab-parallel cross-entropy (loss and gradients),
keeps less for the backward pass, and is what HGRNModel computes when `loss_chunk_tokens` is set."""
import pytest
import torch

from hgrn_megatron.testing.distributed import run_distributed
from tests.model.model_harness import build, grads_of, max_rel_diff, tiny_config

pytestmark = pytest.mark.distributed

FP32_ROUNDING = 2e-5


def _head_inputs(s, b, h, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(s, b, h, generator=g), torch.randn(vocab, h, generator=g) * 0.2,
            torch.randint(0, vocab, (b, s), generator=g), torch.randn(b, s, generator=g))


def _full_and_chunked(tp, s, b, h, vocab, chunk_tokens):
    """This rank's loss and gradients both ways, and the bytes each saves for the backward pass."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    from hgrn_megatron.chunked_loss import chunked_cross_entropy
    from hgrn_megatron.testing.memory import saved_tensor_bytes

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    rank = parallel_state.get_tensor_model_parallel_rank()
    hidden, weight, labels, dloss = _head_inputs(s, b, h, vocab)
    rows = slice(rank * vocab // tp, (rank + 1) * vocab // tp)

    def full(x, w):
        logits = torch.matmul(copy_to_tensor_model_parallel_region(x), w.t())
        return tensor_parallel.vocab_parallel_cross_entropy(logits, labels.t().contiguous()).t()

    def chunked(x, w):
        return chunked_cross_entropy(x, w, labels, chunk_tokens=chunk_tokens)

    out = {}
    for name, fn in (("full", full), ("chunked", chunked)):
        x = hidden.clone().requires_grad_(True)
        w = torch.nn.Parameter(weight[rows].clone())
        loss, saved = saved_tensor_bytes(lambda: fn(x, w), [w])  # noqa: B023 - called at once
        (loss * dloss).sum().backward()
        out[name] = {"loss": loss.detach(), "hidden": x.grad, "weight": w.grad, "saved": saved}
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_chunked_equals_full_cross_entropy(tp):
    # 13 positions x 2 rows in chunks of 10 tokens (5 positions): the last chunk is short.
    ranks = run_distributed(_full_and_chunked, world_size=tp, args=(tp, 13, 2, 16, 64, 10), timeout=120)
    for r in ranks:
        for key in ("loss", "hidden", "weight"):
            assert max_rel_diff(r["chunked"][key], r["full"][key]) < FP32_ROUNDING, key
        assert r["full"]["hidden"].abs().max() > 0


def test_chunked_saves_no_logits():
    s, b, h, vocab = 1024, 1, 32, 2048
    r = run_distributed(_full_and_chunked, world_size=1, args=(1, s, b, h, vocab, 128), timeout=120)[0]
    logits_bytes = s * b * vocab * 4
    assert r["full"]["saved"] >= logits_bytes  # megatron keeps the fp32 softmax
    assert r["chunked"]["saved"] <= s * b * (h * 4 + 8)  # hidden states and labels only


def test_chunk_tokens_must_be_positive():
    from hgrn_megatron.chunked_loss import chunked_cross_entropy

    with pytest.raises(ValueError, match="chunk_tokens must be a positive int"):
        chunked_cross_entropy(torch.zeros(2, 1, 4), torch.zeros(8, 4), torch.zeros(1, 2, dtype=torch.long),
                              chunk_tokens=0)


# ------------------------------------------------------------------------------------------ in the model
def _model_loss_and_grads(cfg, chunk_tokens):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from hgrn_megatron.testing.memory import saved_tensor_bytes

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
    model = build(cfg, seed=0)
    model.loss_chunk_tokens = chunk_tokens
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 256, (2, 25), generator=g)
    loss, saved = saved_tensor_bytes(lambda: model(tokens[:, :-1], labels=tokens[:, 1:]), model.parameters())
    (loss * torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)).sum().backward()
    return {"loss": loss.detach(), "grads": grads_of(model), "saved": saved}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("tp", [1, 2])
def test_model_with_chunked_loss_matches_full_loss(tp, tied):
    cfg = tiny_config(share_embeddings_and_output_weights=tied)
    full = run_distributed(_model_loss_and_grads, world_size=tp, args=(cfg, None), timeout=120)
    chunked = run_distributed(_model_loss_and_grads, world_size=tp, args=(cfg, 14), timeout=120)
    for f, c in zip(full, chunked):
        assert c["saved"] <= f["saved"] - 2 * 24 * 256 // tp * 4  # the chunked path ran: no fp32 logits kept
        assert max_rel_diff(c["loss"], f["loss"]) < FP32_ROUNDING
        assert c["grads"].keys() == f["grads"].keys()
        for key, grad in f["grads"].items():
            assert max_rel_diff(c["grads"][key], grad) < FP32_ROUNDING, key
