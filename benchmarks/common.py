"""Shared pieces of the end-to-end training benchmarks (`train_throughput.py`, `gpu_train_step.py`).

A benchmark step here is the trainer's step: the real engine from `hgrn_megatron.pretrain.engine.build_engine`
(megatron-core model, torch AdamW, DeepSpeed ZeRO) on one rank, fed synthetic token batches. Synthetic tokens
cost the same arithmetic as real text (no op depends on token values), and they keep the data loader out
of a measurement of the model and the engine (its own benchmark is `benchmarks/data_pipeline.py`).
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"


def init_single_rank() -> None:
    """One-process torch.distributed group (nccl with CUDA, gloo without) and megatron parallel state at TP 1."""
    from hgrn_megatron.runtime_env import configure_environment, patch_for_cpu

    configure_environment()
    patch_for_cpu()
    from hgrn_megatron.pretrain.distributed import init_distributed, init_model_parallel

    init_distributed("auto")
    init_model_parallel(1)


def run_config(model: dict, *, micro_batch_size: int, precision: str = "fp32", zero_stage: int = 1,
               run_dir: str = "runs/bench", deepspeed_extra: dict | None = None):
    """A `RunConfig` for one-rank benchmark steps of `model` (ModelConfig fields), one micro-batch per step.

    The data and tokenizer sections point at the shipped sample only because a RunConfig needs them; the
    benchmarks never read them (they feed synthetic tokens).
    """
    from hgrn_megatron.pretrain.config import RunConfig

    return RunConfig.build({
        "run_dir": run_dir,
        "model": model,
        "data": {"train_shards": [str(ASSETS / "pile-mini" / "train-*.jsonl.zst")], "num_workers": 0},
        "tokenizer": {"model": str(ASSETS / "tokenizer" / "tokenizer.model")},
        "train": {"steps": 10**6, "global_batch_size": micro_batch_size, "micro_batch_size": micro_batch_size,
                  "precision": precision, "eval_interval": 0},
        "optimizer": {"lr": 1e-4, "min_lr": 1e-5},
        "schedule": {"warmup_steps": 0, "decay_style": "constant"},
        "parallel": {"zero_stage": zero_stage, "deepspeed_extra": deepspeed_extra or {}},
        "checkpoint": {"interval": 0, "save_at_end": False},
        "logging": {"tensorboard": False},
    })


def build_engine(cfg, vocab_size: int):
    """The trainer's engine for `cfg` on this one rank (DP 1)."""
    from hgrn_megatron.pretrain.engine import build_engine as build

    return build(cfg, vocab_size, dp_size=1)


def synthetic_tokens(vocab_size: int, micro_batch_size: int, seq_length: int, device, seed: int = 0):
    """Random token ids `[micro_batch, seq_length + 1]` (inputs and shifted labels, as the loader gives)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (micro_batch_size, seq_length + 1), generator=gen).to(device)


def train_step(engine, tokens) -> float:
    """One optimizer step on one micro-batch, as the trainer takes it; returns the loss (this syncs the device)."""
    from hgrn_megatron.pretrain.data import model_inputs

    x = model_inputs(tokens)
    loss = engine(x.input_ids, labels=x.labels).float().mean()
    engine.backward(loss)
    engine.step()
    return loss.item()


def timed_step(engine, tokens) -> float:
    """Wall seconds of one `train_step` (the loss `.item()` inside waits for the device)."""
    start = time.perf_counter()
    train_step(engine, tokens)
    return time.perf_counter() - start


def spread(samples: list[float]) -> dict:
    """Median, min, max and the relative spread (max - min) / median of repeated timings."""
    med = statistics.median(samples)
    return {"median": med, "min": min(samples), "max": max(samples),
            "spread": (max(samples) - min(samples)) / med if med else float("nan"), "n": len(samples)}


def machine_info() -> dict:
    """What the figures were measured on (goes into every JSON result)."""
    import torch

    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}
    try:
        info["load_average_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["device_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    else:
        info["device"] = "cpu"
    try:
        import deepspeed
        import megatron.core

        info["deepspeed"], info["megatron_core"] = deepspeed.__version__, megatron.core.__version__
    except Exception:  # noqa: BLE001 - versions are informative only
        pass
    return info



def largest_rank_row(fn, world_size: int, args: tuple, timeout: int = 1800) -> dict:
    """Run `fn` on `world_size` gloo ranks; rank 0's row with the largest saved bytes and seconds of any rank."""
    import hgrn_megatron.model  # noqa: F401  loaded once, before the ranks fork
    from hgrn_megatron.testing.distributed import run_distributed

    ranks = run_distributed(fn, world_size=world_size, args=args, timeout=timeout)
    return {**ranks[0], "saved_bytes": max(r["saved_bytes"] for r in ranks),
            "seconds": max(r["seconds"] for r in ranks)}
