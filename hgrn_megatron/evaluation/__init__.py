"""hgrn_megatron.evaluation: downstream tasks (lm-evaluation-harness) and held-out perplexity for checkpoints.

    hgrn-eval --checkpoint runs/x --tasks piqa,hellaswag --limit 100     # harness, via the HF export
    hgrn-eval --checkpoint runs/x --shards 'heldout/*.jsonl.zst'         # loss / perplexity per source

Modules: `scoring` (log-likelihoods from any `StatefulLM` model callable, batched, reusing context states),
`hf_model` (the exported model as a `StatefulLM`; a checkpoint exported to a temporary folder), `harness_lm`
(the harness's model interface; imports `lm_eval`), `harness_run` (run tasks, save results), `perplexity`
(the trainer's validation on other shards, native model), `offline_tasks` (harness tasks made runnable
without internet), `__main__` (the CLI).
"""
from .scoring import StatefulLM, score_pairs

__all__ = ["StatefulLM", "score_pairs"]
