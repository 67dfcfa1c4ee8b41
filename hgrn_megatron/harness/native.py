"""The native (megatron) model as a `StatefulLM`: the live model inside training, tensor-parallel or not.

    model = native_lm(lambda ids, doc_start: engine(ids, doc_start=doc_start), eos_id=tok.eos_id,
                      vocab_size=tok.vocab_size, reset_documents=cfg.model.reset_at_document_boundary,
                      tp_group=tp_group, device=engine.device)

The native forward takes whole sequences and hands no recurrent state out, so requests are scored as whole
`context + continuation` sequences (`select_state` is None) in one forward each, however long. Each
tensor-parallel rank holds a slice of the vocabulary's logits; they are all-gathered, so every rank of the
group sees the full logits. As in the exported model, a document starts after every EOS when the model resets
its state at document boundaries (the token after EOS gets `doc_start`). Under sequence parallelism the model
takes only lengths that divide by `pad_to` (the TP size): a sequence is padded on the right, which a causal model
cannot see, and the padding's logits are dropped.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.distributed as dist

from .scoring import StatefulLM


def native_lm(call: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], *, eos_id: int,
              vocab_size: int, reset_documents: bool, tp_group=None, device: torch.device | str = "cpu",
              pad_to: int = 1) -> StatefulLM:
    """`call(input_ids [b, s], doc_start [b, s] | None) -> logits [b, s, vocab / tp]`."""
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1

    def forward(input_ids: torch.Tensor, attention_mask, state):
        ids = input_ids.to(device)
        length = ids.shape[1]
        if length % pad_to:
            ids = torch.nn.functional.pad(ids, (0, -length % pad_to), value=eos_id)
        doc_start = None
        if reset_documents:
            first = torch.zeros_like(ids[:, :1], dtype=torch.bool)
            doc_start = torch.cat([first, ids[:, :-1] == eos_id], dim=1)
        logits = call(ids, doc_start)
        if tp > 1:
            pieces = [torch.empty_like(logits) for _ in range(tp)]
            dist.all_gather(pieces, logits.contiguous(), group=tp_group)
            logits = torch.cat(pieces, dim=-1)
        return logits[:, :length], None

    return StatefulLM(forward=forward, select_state=None, vocab_size=vocab_size, chunk_tokens=sys.maxsize)
