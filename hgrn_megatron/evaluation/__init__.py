"""hgrn_megatron.evaluation: downstream tasks (lm-evaluation-harness) and held-out perplexity for checkpoints.

    hgrn-eval --checkpoint runs/x --tasks piqa,hellaswag --limit 100     # harness, via the HF export
    hgrn-eval --checkpoint runs/x --shards 'heldout/*.jsonl.zst'         # loss / perplexity per source

The harness adapter (scoring, the harness's model interface, running tasks) is `hgrn_megatron.harness`, which
the trainer uses too. Modules here: `hf_model` (the exported model as a `StatefulLM`; a checkpoint exported to
a temporary folder), `perplexity` (the trainer's validation on other shards, native model), `offline_tasks`
(harness tasks made runnable without internet), `__main__` (the CLI).
"""
from hgrn_megatron.harness.scoring import StatefulLM, score_pairs

__all__ = ["StatefulLM", "score_pairs"]
