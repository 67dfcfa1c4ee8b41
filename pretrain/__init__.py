"""hgrn_megatron.pretrain: data pipeline, DeepSpeed engine, sharded checkpoints, training loop, logging.

May import the core (`hgrn_megatron`: model, corpus), `hgrn_megatron.kernels` and `hgrn_megatron.tokenizer`; only the
layers above it (export, evaluation) import it.

Exit codes of `hgrn-pretrain` (launch scripts rely on them):
"""

EXIT_OK = 0
"""The run reached train.steps."""
EXIT_CONFIG_ERROR = 2
"""The config or command line is invalid (one line per problem on stderr), before any rank started work."""
EXIT_ABORTED = 3
"""Too many non-finite steps in a row; no checkpoint of the poisoned state was written."""
EXIT_REQUEUE = 75
"""Preempted (SIGUSR1/SIGTERM) or out of wall-clock budget: a checkpoint was saved; requeue to resume."""
EXIT_HUNG = 76
"""The hang watchdog found no progress for train.hang_timeout_minutes (or the start-up allowance); every thread's
stack is in RUN_DIR/hangs/. Requeued like a crash."""
