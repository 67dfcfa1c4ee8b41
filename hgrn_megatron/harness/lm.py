"""lm-evaluation-harness's model interface over a scorer and a tokenizer (imports `lm_eval`).

    lm = HGRNHarnessLM(stateful_hf_model(model), tokenizer, batch_size=16)    # scored in this process
    lm = HGRNHarnessLM(split_scorer, tokenizer)                               # scored by data-parallel ranks
    lm_eval.simple_evaluate(model=lm, tasks=[...])

The harness hands over (context, continuation) strings; `TemplateLM` tokenizes them as causal models are
scored everywhere (whole string encoded, split at the context's length; an empty context becomes EOS, the
document separator of the training data) and `_loglikelihood_tokens` hands the token pairs to the scorer
(`scorer.LocalScorer`: `scoring.score_pairs`, where contexts shared by several requests run once).
A recurrent model has no context window, so `loglikelihood_rolling` scores a whole document in one pass (in
chunks that carry the state) rather than in overlapping windows.
"""
from __future__ import annotations

import time

from lm_eval.api.model import TemplateLM

from .scorer import DEFAULT_MAX_GEN_TOKS, LocalScorer
from .scoring import StatefulLM


class HGRNHarnessLM(TemplateLM):
    """`model`: a `StatefulLM` (scored here by a `LocalScorer` with `batch_size` and `reuse_prefix`) or any
    scorer with `loglikelihood(pairs)` and `generate(requests)` (then those two arguments are its own)."""

    def __init__(self, model, tokenizer, batch_size: int = 16, reuse_prefix: bool = True):
        super().__init__()
        self.scorer = LocalScorer(model, tokenizer, batch_size, reuse_prefix) if isinstance(model, StatefulLM) \
            else model
        self.hgrn_tokenizer = tokenizer  # encode / decode / eos_id, as hgrn_megatron.tokenizer.Tokenizer
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
        out = self.scorer.loglikelihood([(context_enc, continuation_enc) for _, context_enc, continuation_enc
                                         in requests])
        self.stats["requests"] += len(requests)
        self.stats["seconds"] += time.perf_counter() - started
        for (key, _, _), score in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", key, score)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs = [([self.eot_token_id], self.tok_encode(req.args[0])) for req in requests]
        keep = [i for i, (_, cont) in enumerate(pairs) if cont]
        scored = self.scorer.loglikelihood([pairs[i] for i in keep])
        out = [0.0] * len(pairs)  # an empty document has probability 1
        for i, (logprob, _) in zip(keep, scored):
            out[i] = logprob
        for req, value in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), value)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding (`scorer.greedy_text`): stops at EOS, a stop string or `max_gen_toks`."""
        work = []
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            work.append((self.tok_encode(context), until, int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))))
        out = self.scorer.generate(work)
        for req, text in zip(requests, out):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out
