"""lm-evaluation-harness's model interface over a `StatefulLM` and a tokenizer (imports `lm_eval`).

    lm = HGRNHarnessLM(stateful_hf_model(model), tokenizer, batch_size=16)
    lm_eval.simple_evaluate(model=lm, tasks=[...])

The harness hands over (context, continuation) strings; `TemplateLM` tokenizes them as causal models are
scored everywhere (whole string encoded, split at the context's length; an empty context becomes EOS, the
document separator of the training data) and `_loglikelihood_tokens` scores the token pairs with
`scoring.score_pairs`: contexts shared by several requests (the choices of a multiple-choice item) run once.
A recurrent model has no context window, so `loglikelihood_rolling` scores a whole document in one pass (in
chunks that carry the state) rather than in overlapping windows.
"""
from __future__ import annotations

import time

import torch
from lm_eval.api.model import TemplateLM

from .scoring import StatefulLM, score_pairs

DEFAULT_MAX_GEN_TOKS = 256


class HGRNHarnessLM(TemplateLM):
    def __init__(self, model: StatefulLM, tokenizer, batch_size: int = 16, reuse_prefix: bool = True):
        super().__init__()
        self.model = model
        self.hgrn_tokenizer = tokenizer  # encode / decode / eos_id, as hgrn_megatron.tokenizer.Tokenizer
        self.batch_size = batch_size
        self.reuse_prefix = reuse_prefix
        self.stats = {"requests": 0, "seconds": 0.0}  # loglikelihood requests scored and the time they took

    @property
    def eot_token_id(self) -> int:
        return self.hgrn_tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.hgrn_tokenizer.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.hgrn_tokenizer.decode(tokens)

    @property
    def tokenizer_name(self) -> str:
        return "hgrn-sentencepiece"

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        started = time.perf_counter()
        pairs = [(context_enc, continuation_enc) for _, context_enc, continuation_enc in requests]
        out = score_pairs(self.model, pairs, self.batch_size, self.reuse_prefix)
        self.stats["requests"] += len(requests)
        self.stats["seconds"] += time.perf_counter() - started
        for (key, _, _), score in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", key, score)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs = [([self.eot_token_id], self.tok_encode(req.args[0])) for req in requests]
        keep = [i for i, (_, cont) in enumerate(pairs) if cont]
        scored = score_pairs(self.model, [pairs[i] for i in keep], self.batch_size, self.reuse_prefix)
        out = [0.0] * len(pairs)  # an empty document has probability 1
        for i, (logprob, _) in zip(keep, scored):
            out[i] = logprob
        for req, value in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), value)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding, one request at a time, carrying the state (no re-run of the prefix per token)."""
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            text = self._greedy(context, dict(gen_kwargs or {}))
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out

    def _greedy(self, context: str, gen_kwargs: dict) -> str:
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        ids = self.tok_encode(context) or [self.eot_token_id]
        generated: list[int] = []
        with torch.inference_mode():
            logits, state = self.model.forward(torch.tensor([ids]), None, None)
            for _ in range(max_new):
                last = logits[0, -1]
                if self.model.vocab_size is not None:
                    last = last[: self.model.vocab_size]
                token = int(last.argmax())
                if token == self.eot_token_id:
                    break
                generated.append(token)
                text = self.tok_decode(generated)
                if any(stop in text for stop in until):
                    break
                if not self.model.carries_state:  # no state to continue from: run the whole sequence again
                    logits, state = self.model.forward(torch.tensor([ids + generated]), None, None)
                else:
                    logits, state = self.model.forward(torch.tensor([[token]]), None, state)
        text = self.tok_decode(generated)
        for stop in until:
            text = text.split(stop)[0]
        return text
