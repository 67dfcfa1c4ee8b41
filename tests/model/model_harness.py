"""Shared pieces of the model tests: tiny configs, rank set-up, batches.

Rank functions run in processes forked by `run_distributed`, so they live at module level and return only
picklable values (tensors included).
"""
from __future__ import annotations

import torch

import hgrn_megatron.model  # noqa: F401  imported here, in the parent, so forked ranks start with megatron loaded
from hgrn_megatron.config import ModelConfig
from hgrn_megatron.pretrain.data import model_inputs

VOCAB = 256  # padded vocabulary of the test models (divisible by 2 for TP = 2)


def tiny_config(**overrides) -> ModelConfig:
    """The `tiny` preset with overrides (each test states what it changes)."""
    return ModelConfig.build({"preset": "tiny", **overrides})


def init_model_parallel() -> int:
    """megatron parallel_state with TP = the whole gloo world; returns this rank's TP rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
    return parallel_state.get_tensor_model_parallel_rank()


def build(cfg: ModelConfig, seed: int = 0, vocab: int = VOCAB):
    from hgrn_megatron.model import build_model

    torch.manual_seed(seed)
    return build_model(cfg, vocab)


def tensors_of(state_dict) -> dict[str, torch.Tensor]:
    """A state dict without megatron's `_extra_state` bookkeeping entries, detached and cloned."""
    return {k: v.detach().clone() for k, v in state_dict.items() if not k.endswith("_extra_state")}


def grads_of(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def batch(b: int = 2, s: int = 24, vocab: int = VOCAB, seed: int = 7, doc_starts=(0, 9, 17)):
    """(input_ids, labels, doc_start) with documents starting at `doc_starts` in every row."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, s + 1), generator=g)
    doc_start = torch.zeros(b, s, dtype=torch.bool)
    doc_start[:, list(doc_starts)] = True
    x = model_inputs(tokens)
    return x.input_ids.contiguous(), x.labels.contiguous(), doc_start


def train_steps(model, steps: int, lr: float = 3e-3) -> list[float]:
    """`steps` AdamW steps of `model` on one fixed batch (4 x 32 tokens with document starts); the losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ids, labels, doc_start = batch(b=4, s=32)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = model(ids, labels=labels, doc_start=doc_start).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (0 when both are zero)."""
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def measured_matmul_flops(cfg: ModelConfig, b: int, s: int) -> float:
    """Rank function: FLOPs of the linear layers (aten.mm/addmm) in one forward + backward, by torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    init_model_parallel()
    model = build(cfg)
    ids, labels, doc_start = batch(b=b, s=s, doc_starts=(0, s // 2))
    counter = FlopCounterMode(display=False)
    with counter:
        model(ids, labels=labels, doc_start=doc_start).sum().backward()
    # Linear layers run as aten.mm/addmm; attention scores (and any batched matmul inside a scan) do not.
    return sum(n for op, n in counter.get_flop_counts()["Global"].items() if str(op) in ("aten.mm", "aten.addmm"))


# ------------------------------------------------------------------------------ TP = 2 against TP = 1
FP32_ROUNDING = 2e-5  # relative to each tensor's largest entry


def forward_backward(cfg: ModelConfig, full_state, identity_norm_backward: bool = False) -> dict:
    """Rank function: logits, per-token loss and gradients on this rank; loads `full_state` split for this rank
    (by `tp_rules`) if given."""
    from hgrn_megatron.tp_rules import split_state_dict

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


def run_tp1_and_tp2(cfg: ModelConfig, identity_norm_backward: bool = False):
    """(TP = 1 result, [TP = 2 rank results]); the TP = 2 ranks start from the TP = 1 weights, split."""
    from hgrn_megatron.testing.distributed import run_distributed

    tp1 = run_distributed(forward_backward, world_size=1, args=(cfg, None), timeout=120)[0]
    tp2 = run_distributed(forward_backward, world_size=2, args=(cfg, tp1["state"], identity_norm_backward),
                          timeout=120)
    return tp1, tp2


def assert_tp2_matches_tp1(tp1: dict, tp2: list[dict]) -> None:
    """Same initial and final weights (merged by `tp_rules`), logits, losses and every gradient."""
    from hgrn_megatron.tp_rules import merge_state_dicts

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


# ------------------------------------------------------------------------------ document resets
PREFIX, DOC = 11, 13  # a previous document's tail, then a new document


def packed_vs_fresh(cfgs: list[ModelConfig]) -> list[dict]:
    """Rank function: for each config (same seed, so the same weights), logits of [prefix | doc] with a
    document start at PREFIX, of [prefix | doc] without one, and of doc alone."""
    from hgrn_megatron.model import build_model

    init_model_parallel()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (2, PREFIX + DOC), generator=g)
    doc_start = torch.zeros_like(tokens, dtype=torch.bool)
    doc_start[:, 0] = doc_start[:, PREFIX] = True
    out = []
    for cfg in cfgs:
        torch.manual_seed(0)
        model = build_model(cfg, VOCAB)
        with torch.no_grad():
            out.append({
                "packed": model(tokens, doc_start=doc_start)[:, PREFIX:],
                "packed_without_mask": model(tokens)[:, PREFIX:],
                "fresh": model(tokens[:, PREFIX:].contiguous(), doc_start=doc_start[:, PREFIX:].contiguous()),
            })
    return out
