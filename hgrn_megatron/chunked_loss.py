"""The LM head and cross-entropy over sequence chunks, without keeping the logits.

megatron's output layer materialises the logits `[s, b, vocab / tp]` and its vocab-parallel cross-entropy keeps
their fp32 softmax for the backward pass: at 256 k tokens and a 32 k vocabulary that is 32 GiB per sequence,
more than the rest of a 1 B model's activations. Here the forward pass computes each chunk's logits and loss and
drops the logits; the backward pass recomputes one chunk's logits at a time, takes its gradient through megatron's
own `vocab_parallel_cross_entropy` (so the loss is the same function at every TP size, the max and sum-exp
all-reduced over the TP group) and accumulates the hidden-state and weight gradients. What is saved is the
hidden states and the labels; the price is one more `hidden @ Wᵀ` per token in the backward pass.

    loss = chunked_cross_entropy(hidden [s, b, h], weight [vocab / tp, h], labels [b, s], chunk_tokens=4096)
"""
from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, chunk_tokens: int,
                          sequence_parallel: bool = False, tp_group=None) -> torch.Tensor:
    """Per-token loss `[b, s]` (fp32) of the logits `hidden @ weightᵀ`, computed `chunk_tokens` tokens at a time.

    hidden: `[s, b, h]`, megatron's layout (`[s / tp, b, h]` with sequence parallelism: gathered here, as the
    output layer would); weight: this rank's vocabulary rows `[vocab / tp, h]`; labels: `[b, s]`. Gradients
    reach hidden (all-reduced over TP, or reduce-scattered with sequence parallelism) and weight.
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunked_cross_entropy: chunk_tokens must be a positive int, got {chunk_tokens!r}")
    if sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True, group=tp_group)
    else:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    s, b, _ = hidden.shape
    if tuple(labels.shape) != (b, s):
        raise ValueError(f"chunked_cross_entropy: labels must be [batch, seq] = [{b}, {s}], "
                         f"got {tuple(labels.shape)}")
    rows = max(1, chunk_tokens // b)  # sequence positions per chunk
    loss = _ChunkedCrossEntropy.apply(hidden, weight, labels.t().contiguous(), rows)
    return loss.t().contiguous()


def _chunk_logits(hidden_chunk: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The output layer's matmul, in the hidden states' dtype as megatron computes it."""
    return torch.matmul(hidden_chunk, weight.t())


class _ChunkedCrossEntropy(torch.autograd.Function):
    """hidden `[s, b, h]`, weight `[v, h]`, labels `[s, b]` -> loss `[s, b]`; logits recomputed in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, rows):
        loss = torch.empty(labels.shape, dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            end = min(start + rows, hidden.shape[0])
            logits = _chunk_logits(hidden[start:end], weight)
            loss[start:end] = tensor_parallel.vocab_parallel_cross_entropy(logits, labels[start:end])
        ctx.save_for_backward(hidden, weight, labels)
        ctx.rows = rows
        return loss

    @staticmethod
    def backward(ctx, dloss):
        hidden, weight, labels = ctx.saved_tensors
        dhidden = torch.empty_like(hidden)
        dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], ctx.rows):
            end = min(start + ctx.rows, hidden.shape[0])
            chunk = hidden[start:end].detach()
            with torch.enable_grad():
                logits = _chunk_logits(chunk, weight.detach()).requires_grad_(True)
                # megatron's cross-entropy works on its input in place: keep a handle on the leaf.
                loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels[start:end])
                (dlogits,) = torch.autograd.grad(loss, logits, dloss[start:end])
            dlogits = dlogits.to(hidden.dtype)
            dhidden[start:end] = torch.matmul(dlogits, weight)
            dweight.addmm_(dlogits.flatten(0, 1).t().float(), chunk.flatten(0, 1).float())
        return dhidden, dweight.to(weight.dtype), None, None
