"""Log-likelihoods of token continuations from a recurrent language model, batched, reusing context states.

The model is a callable, not a file (an exported model: `evaluation.hf_model`; the live training model:
`native.native_lm`): `StatefulLM(forward, select_state)` where

    forward(input_ids Long[B, T], attention_mask Long[B, T] | None, state | None) -> (logits [B, T, V], state)
    select_state(state, rows Long[N]) -> a new state holding those rows (rows may repeat)

`attention_mask` marks real tokens (0 = left padding, which must leave the state untouched). The exported
Hugging Face model provides both (`hf_model.stateful_hf_model`); a model that cannot hand its state over (no
`select_state`) is scored on whole `context + continuation` sequences instead.

With a state, every distinct context runs once: its last logits score the first continuation token and its
final state, copied to each of its continuations, starts their forward. A recurrent state is O(layers x
channels) per row, so carrying it costs nothing next to re-running the context.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

PAD_ID = 0  # any id but EOS: a padded EOS would mark the next token as a document start
DEFAULT_CHUNK_TOKENS = 2048  # positions per forward; longer inputs carry the state across chunks


@dataclass
class StatefulLM:
    forward: Callable[..., tuple[torch.Tensor, Any]]
    select_state: Callable[[Any, torch.Tensor], Any] | None = None
    vocab_size: int | None = None  # logits past it (tensor-parallel padding rows) are dropped before softmax
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    @property
    def carries_state(self) -> bool:
        return self.select_state is not None


Pair = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids); both non-empty


def _log_probs(model: StatefulLM, logits: torch.Tensor) -> torch.Tensor:
    if model.vocab_size is not None:
        logits = logits[..., : model.vocab_size]
    return torch.log_softmax(logits.double(), dim=-1)


def _pad(rows: list[Sequence[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _run(model: StatefulLM, ids: torch.Tensor, mask: torch.Tensor | None, state, want_logits: bool):
    """Forward over `ids` in chunks of `model.chunk_tokens`, carrying the state. Returns (logits of every
    position, or of the last one only when not `want_logits`; final state)."""
    pieces = []
    for start in range(0, ids.shape[1], model.chunk_tokens):
        end = start + model.chunk_tokens
        window_mask = None if mask is None else mask[:, start:end]
        logits, state = model.forward(ids[:, start:end], window_mask, state)
        if want_logits or end >= ids.shape[1]:
            pieces.append(logits if want_logits else logits[:, -1:])
    return torch.cat(pieces, dim=1), state


def _score_rows(model: StatefulLM, logits: torch.Tensor, targets: list[Sequence[int]], offsets: list[int]):
    """Per row: (sum of log p(target_j) at position offset + j, every target the argmax). The float64
    log-softmax runs only on the scored positions."""
    out = []
    for row, (tgt, off) in enumerate(zip(targets, offsets)):
        tgt_t = torch.as_tensor(list(tgt), dtype=torch.long, device=logits.device)
        lp = _log_probs(model, logits[row, off : off + len(tgt)])
        out.append((lp.gather(-1, tgt_t[:, None]).sum().item(), bool((lp.argmax(-1) == tgt_t).all())))
    return out


def score_pairs(model: StatefulLM, pairs: Sequence[Pair], batch_size: int = 16,
                reuse_prefix: bool = True) -> list[tuple[float, bool]]:
    """(log p(continuation | context), continuation is the greedy decode) for every pair, in input order."""
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise ValueError(f"pair {i}: context and continuation must both hold tokens")
    # no_grad, not inference_mode: under ZeRO-3 the forward gathers parameters, and a gathered parameter that
    # stays resident would be an inference tensor the next training step cannot use
    with torch.no_grad():
        if reuse_prefix and model.carries_state:
            return _score_with_prefix_states(model, pairs, batch_size)
        return _score_whole_sequences(model, pairs, batch_size)


def _score_whole_sequences(model: StatefulLM, pairs: Sequence[Pair], batch_size: int):
    """Each pair as one right-padded sequence `context + continuation[:-1]`; longest first."""
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = [list(pairs[i][0]) + list(pairs[i][1])[:-1] for i in idx]
        ids, _ = _pad(rows, left=False)  # right padding never reaches an earlier position
        logits, _ = _run(model, ids, None, None, want_logits=True)
        scored = _score_rows(model, logits, [pairs[i][1] for i in idx], [len(pairs[i][0]) - 1 for i in idx])
        for i, s in zip(idx, scored):
            results[i] = s
    return results


def _score_with_prefix_states(model: StatefulLM, pairs: Sequence[Pair], batch_size: int):
    """Distinct contexts in left-padded batches (longest first); then each batch's continuations, from copies of
    their context's state, in right-padded batches."""
    by_context: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, (ctx, _) in enumerate(pairs):
        by_context[tuple(ctx)].append(i)
    contexts = sorted(by_context, key=len, reverse=True)
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    for start in range(0, len(contexts), batch_size):
        group = contexts[start : start + batch_size]
        ids, mask = _pad(group, left=True)
        last_logits, state = _run(model, ids, mask, None, want_logits=False)
        last = _log_probs(model, last_logits)
        members = [(row, i) for row, ctx in enumerate(group) for i in by_context[ctx]]
        members.sort(key=lambda m: -len(pairs[m[1]][1]))
        for sub in range(0, len(members), batch_size):
            chunk = members[sub : sub + batch_size]
            for (_, i), score in zip(chunk, _score_continuations(model, pairs, chunk, last, state)):
                results[i] = score
    return results


def _score_continuations(model: StatefulLM, pairs: Sequence[Pair], members: list[tuple[int, int]],
                         context_last: torch.Tensor, context_state):
    """Continuations `members` = [(context row, pair index)]: the first token from the context's last
    log-probs, the rest from a forward of `continuation[:-1]` started from the context's state."""
    firsts = []
    for row, i in members:
        first = pairs[i][1][0]
        lp = context_last[row, -1]
        firsts.append((lp[first].item(), bool(lp.argmax().item() == first)))
    longer = [(k, row, i) for k, (row, i) in enumerate(members) if len(pairs[i][1]) > 1]
    rest: dict[int, tuple[float, bool]] = {}
    if longer:
        rows = torch.tensor([row for _, row, _ in longer], dtype=torch.long)
        state = model.select_state(context_state, rows)
        ids, _ = _pad([list(pairs[i][1])[:-1] for _, _, i in longer], left=False)
        logits, _ = _run(model, ids, None, state, want_logits=True)
        scored = _score_rows(model, logits, [list(pairs[i][1])[1:] for _, _, i in longer], [0] * len(longer))
        rest = {k: s for (k, _, _), s in zip(longer, scored)}
    out = []
    for k, (lp, greedy) in enumerate(firsts):
        more_lp, more_greedy = rest.get(k, (0.0, True))
        out.append((lp + more_lp, greedy and more_greedy))
    return out
