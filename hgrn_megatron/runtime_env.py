"""The one place that prepares the process environment for DeepSpeed and megatron-core, on GPU and on CPU.

Call `configure_environment()` before importing deepspeed (the accelerator is chosen at import) and
`patch_for_cpu()` after; tests, the trainer and the benchmarks all go through here.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# Import-time notices from megatron-core/DeepSpeed about optional libraries we deliberately run without
# (Apex, Transformer Engine) and deprecations inside those packages. This is the one filter list: the trainer,
# the tools and the test suite all call `configure_environment`.
QUIET_WARNINGS = [
    dict(message=r".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*", category=UserWarning),
    dict(message=r".*full scope is deprecated.*", category=UserWarning),
    dict(message=r".*custom_layers.transformer_engine.*", category=DeprecationWarning),
    dict(category=DeprecationWarning, module=r"(megatron|deepspeed|torch\.jit)\..*"),
    dict(category=FutureWarning, module=r"(megatron|deepspeed)\..*"),
    # DeepSpeed's ZeRO all-gathers call torch.distributed.all_gather_into_tensor, deprecated by torch 2.13; torch
    # attributes the warning to its own c10d_logger wrapper, so the module filter above does not catch it.
    dict(message=r".*all_gather_into_tensor. is deprecated.*", category=FutureWarning),
]


def pytest_filter_lines() -> list[str]:
    """The same filters in pytest's `filterwarnings` syntax (pytest re-enables deprecation warnings per test)."""
    lines = []
    for spec in QUIET_WARNINGS:
        category = spec["category"].__name__
        lines.append(f"ignore:{spec.get('message', '')}:{category}:{spec.get('module', '')}")
    return lines


def configure_environment() -> None:
    """Environment variables that must be set before deepspeed/megatron are imported, and warning filters."""
    import warnings

    for spec in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", **spec)
    # OpenMP threads that spin while waiting stall every parallel op when another process holds a core
    # (measured on a shared 2-core host: the torch scan ran at 0.3x of its speed with the default policy,
    # 7.6x with PASSIVE). Must be set before torch starts its OpenMP runtime; users may override it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not cuda_available():
        # DeepSpeed picks its accelerator at import time; without this it probes for CUDA and warns.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # JIT-built extensions (if a user enables one) go inside the project, not the home directory.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(PROJECT_ROOT / ".cache" / "torch_extensions"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(PROJECT_ROOT / ".cache" / "triton"))
    # Quiet the tokenizers/transformers fork warning; our loaders fork after tokenizer use.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def exit_quietly_on_broken_pipe(main):
    """For a console script's `main`: output piped into a reader that stops early (`hgrn-model info | head`)
    ends the program quietly with 141 (128 + SIGPIPE, as a program killed by SIGPIPE reports), no traceback."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            try:
                return main(*args, **kwargs)
            finally:  # also after --help's SystemExit: buffered output meets the closed pipe here, not at exit
                sys.stdout.flush()
        except BrokenPipeError:
            # Python flushes stdout again at exit; point it at /dev/null so that flush has nowhere to fail.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 141

    return wrapped


_patched = False


def patch_for_cpu() -> None:
    """Make DeepSpeed and megatron-core run on a CPU-only machine without JIT builds. Idempotent."""
    global _patched
    if _patched or cuda_available():
        return
    _patched = True
    import torch

    # megatron's dist_checkpointing calls torch.cuda.synchronize() while saving; there is nothing to sync.
    torch.cuda.synchronize = lambda *args, **kwargs: None
    import importlib

    # megatron's activation recompute saves and restores the CUDA RNG state around each recomputed block (for
    # dropout); without CUDA there is none, and the CPU state it also saves is the one that matters.
    megatron_random = importlib.import_module("megatron.core.tensor_parallel.random")
    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: None
    megatron_random._set_cuda_rng_state = lambda *args, **kwargs: None

    try:
        # `import deepspeed.comm.torch as m` would bind the *torch* package (deepspeed.comm imports torch).
        ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    # DeepSpeed's CPU accelerator JIT-builds a shared-memory all-reduce op (25-40 s) at init_distributed,
    # used only for inference; training all-reduces go through gloo.
    ds_comm_torch.build_shm_op = lambda: None
