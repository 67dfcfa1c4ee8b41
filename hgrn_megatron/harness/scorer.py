"""What the harness's model interface asks of a model, answered in this process: log-likelihoods of token pairs
and greedy continuations. `split.SplitScorer` answers the same two calls with the work shared by data-parallel
ranks.

    scorer = LocalScorer(stateful_lm, tokenizer, batch_size=16)
    scorer.loglikelihood([(context_ids, continuation_ids), ...])   # [(log p, is greedy), ...]
    scorer.generate([(context_ids, ["\\n\\n"], 32), ...])           # [text, ...]
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .scoring import Pair, StatefulLM, score_pairs

DEFAULT_MAX_GEN_TOKS = 256
GenRequest = tuple[Sequence[int], list[str], int]  # (context ids, stop strings, most new tokens)


class LocalScorer:
    """`tokenizer`: `decode` and `eos_id`, as `hgrn_megatron.tokenizer.Tokenizer` has them."""

    def __init__(self, model: StatefulLM, tokenizer, batch_size: int = 16, reuse_prefix: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.reuse_prefix = batch_size, reuse_prefix

    @property
    def reuses_prefix(self) -> bool:
        return self.reuse_prefix and self.model.carries_state

    def loglikelihood(self, pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
        return score_pairs(self.model, pairs, self.batch_size, self.reuse_prefix)

    def generate(self, requests: Sequence[GenRequest]) -> list[str]:
        return [greedy_text(self.model, self.tokenizer, ids, until, max_new) for ids, until, max_new in requests]


def greedy_text(model: StatefulLM, tokenizer, ids: Sequence[int], until: list[str], max_new: int) -> str:
    """Greedy decoding from `ids`, carrying the state (no re-run of the prefix per token) when the model can;
    stops at EOS, at a stop string (cut off) or after `max_new` tokens."""
    ids = list(ids) or [tokenizer.eos_id]
    generated: list[int] = []
    with torch.no_grad():
        logits, state = model.forward(torch.tensor([ids]), None, None)
        for _ in range(max_new):
            last = logits[0, -1]
            if model.vocab_size is not None:
                last = last[: model.vocab_size]
            token = int(last.argmax())
            if token == tokenizer.eos_id:
                break
            generated.append(token)
            if any(stop in tokenizer.decode(generated) for stop in until):
                break
            if not model.carries_state:  # no state to continue from: run the whole sequence again
                logits, state = model.forward(torch.tensor([ids + generated]), None, None)
            else:
                logits, state = model.forward(torch.tensor([[token]]), None, state)
    text = tokenizer.decode(generated)
    for stop in until:
        text = text.split(stop)[0]
    return text
