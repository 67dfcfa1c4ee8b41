"""Sharded, atomic, verified checkpoints and resume.

Layout of one checkpoint (`RUN_DIR/checkpoints/step-NNNNNNNN/`):
    ds/                  DeepSpeed's own tag folder: per-rank model and ZeRO optimizer shards
    rng/rank-RRRRR.pt    every rank's python/numpy/torch/cuda RNG states
    data_state.pt        the data pipeline's global state (merged from every rank)
    run_state.json       the run's progress and layout (`pretrain.train_state`: step, consumed samples/tokens,
                         world and parallel sizes, tokenizer sha256, ...)
    config.yaml          the resolved run config
    manifest.json        every file with its size and XXH3-128 digest (`manifest.py`); written last
The folder is written as `step-NNNNNNNN.tmp/` (every rank fsyncs and digests the files it writes, `engine_io.py`)
and renamed only after every rank has finished; `latest` (a text file naming the folder) is replaced atomically
after the rename. Resume (`load.py`) picks the newest folder whose manifest checks out, every rank checking the
bytes of its own files, and falls back to older ones, with a warning, when the newest is torn or corrupt.

Modules: `files` (atomic writes, digests, errors), `manifest`, `engine_io` (DeepSpeed checkpoint engine),
`snapshot` (host buffers of background saves), `save`, `load`, `universal` (the universal conversion over a worker
pool), `reshard` (`hgrn-checkpoint reshard`), `retention`.
"""
from .files import (
    CheckpointError,
    CheckpointWriteError,
    atomic_torch_save,
    atomic_write_bytes,
    describe_write_error,
    file_digest,
)
from .load import (
    DS_UNIVERSAL_TAG,
    NEW_PHASE_MODEL_CHANGES,
    RESUMABLE_MODEL_CHANGES,
    content_problem,
    convert_to_universal,
    find_resume_checkpoint,
    load_checkpoint,
    load_data_state,
    model_differences,
    read_run_state,
    resume_candidates,
    unusable_error,
    verify_checkpoint,
)
from .manifest import MANIFEST, read_manifest, write_manifest
from .retention import (
    RetentionPolicy,
    apply_retention,
    list_checkpoints,
    remove_unfinished_saves,
    set_aside_later_checkpoints,
    step_dir_name,
)
from .save import DS_TAG, Checkpointer, rng_state, save_checkpoint, set_rng_state, universal_checkpoint_info

__all__ = [
    "DS_TAG",
    "DS_UNIVERSAL_TAG",
    "MANIFEST",
    "NEW_PHASE_MODEL_CHANGES",
    "RESUMABLE_MODEL_CHANGES",
    "CheckpointError",
    "CheckpointWriteError",
    "Checkpointer",
    "RetentionPolicy",
    "apply_retention",
    "atomic_torch_save",
    "atomic_write_bytes",
    "content_problem",
    "convert_to_universal",
    "describe_write_error",
    "file_digest",
    "find_resume_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_data_state",
    "model_differences",
    "read_manifest",
    "read_run_state",
    "remove_unfinished_saves",
    "resume_candidates",
    "rng_state",
    "save_checkpoint",
    "set_aside_later_checkpoints",
    "set_rng_state",
    "step_dir_name",
    "universal_checkpoint_info",
    "unusable_error",
    "verify_checkpoint",
    "write_manifest",
]
