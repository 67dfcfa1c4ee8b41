"""Rank functions of the context-parallel model tests (module level: `run_distributed` forks the ranks)."""
from __future__ import annotations

import torch

from tests.model.model_harness import build, grads_of, tensors_of

SEQ = 24  # splits into 2 and 4 pieces


def cp_batch(b: int = 2, vocab: int = 256, seed: int = 7):
    """(input_ids, labels, doc_start): row 0 has documents starting at 0, 9, 12 (the CP 2 boundary) and 17;
    row 1 one document from 0 and one from 5, so its state crosses every piece boundary."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, SEQ + 1), generator=g)
    doc_start = torch.zeros(b, SEQ, dtype=torch.bool)
    doc_start[0, [0, 9, 12, 17]] = True
    doc_start[1, [0, 5]] = True
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), doc_start


def forward_backward(cfg, tp: int, cp: int, full_state=None):
    """Logits and per-token loss of this rank's piece; gradients of the sequence-normalised loss, summed over
    the CP group (what data-parallel reduction over DP × CP does)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from hgrn_megatron.context_parallel import sequence_piece
    from hgrn_megatron.tp_rules import split_state_dict

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    group = parallel_state.get_context_parallel_group()
    model = build(cfg, seed=0)
    if full_state is not None:
        model.load_state_dict(split_state_dict(full_state, tp, parallel_state.get_tensor_model_parallel_rank()),
                              strict=False)
    ids, labels, doc_start = (sequence_piece(t, group) for t in cp_batch())
    with torch.no_grad():
        logits = model(ids, doc_start=doc_start)  # evaluation: the exchange runs without autograd
    loss = model(ids, labels=labels, doc_start=doc_start)
    weights = sequence_piece(torch.linspace(0.5, 1.5, 2 * SEQ).view(2, SEQ), group)
    tokens = torch.tensor(float(loss.numel()))
    dist.all_reduce(tokens, group=group)  # the whole sequence's token count
    ((loss * weights).sum() / tokens).backward()
    for p in model.parameters():
        dist.all_reduce(p.grad, group=group)
    return {"logits": logits.detach(), "loss": loss.detach(), "grads": grads_of(model),
            "state": tensors_of(model.state_dict()), "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "cp_rank": parallel_state.get_context_parallel_rank()}
