"""hgrn_megatron.harness: lm-evaluation-harness on any model callable, in one process or shared by
data-parallel ranks. Used by `hgrn-eval` (an exported checkpoint) and by the trainer (the live model).

Modules: `scoring` (log-likelihoods from a `StatefulLM` callable, batched, reusing context states),
`scorer` (`LocalScorer`: log-likelihoods and greedy generation in this process), `split` (`SplitScorer`: the
same work dealt to data-parallel replicas, results gathered on rank 0), `native` (the megatron model as a
`StatefulLM`, TP logits gathered), `lm` (the harness's model interface; imports `lm_eval`), `tasks` (run
tasks, find them, save results). Only `lm` and the functions of `tasks` that run the harness need `lm_eval`.
"""
from .scoring import StatefulLM, score_pairs

__all__ = ["StatefulLM", "score_pairs"]
