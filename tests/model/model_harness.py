"""Shared pieces of the model tests: tiny configs, rank set-up, batches.

Rank functions run in processes forked by `run_distributed`, so they live at module level and return only
picklable values (tensors included).
"""
from __future__ import annotations

import torch

import hgrn_megatron.model  # noqa: F401  imported here, in the parent, so forked ranks start with megatron loaded
from hgrn_megatron.config import ModelConfig
from hgrn_megatron.pretrain.data import model_inputs

VOCAB = 256  # padded vocabulary of the test models (divisible by 2 for TP = 2)


def tiny_config(**overrides) -> ModelConfig:
    """The `tiny` preset with overrides (each test states what it changes)."""
    return ModelConfig.build({"preset": "tiny", **overrides})


def init_model_parallel() -> int:
    """megatron parallel_state with TP = the whole gloo world; returns this rank's TP rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
    return parallel_state.get_tensor_model_parallel_rank()


def build(cfg: ModelConfig, seed: int = 0, vocab: int = VOCAB):
    from hgrn_megatron.model import build_model

    torch.manual_seed(seed)
    return build_model(cfg, vocab)


def tensors_of(state_dict) -> dict[str, torch.Tensor]:
    """A state dict without megatron's `_extra_state` bookkeeping entries, detached and cloned."""
    return {k: v.detach().clone() for k, v in state_dict.items() if not k.endswith("_extra_state")}


def grads_of(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def batch(b: int = 2, s: int = 24, vocab: int = VOCAB, seed: int = 7, doc_starts=(0, 9, 17)):
    """(input_ids, labels, doc_start) with documents starting at `doc_starts` in every row."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, s + 1), generator=g)
    doc_start = torch.zeros(b, s, dtype=torch.bool)
    doc_start[:, list(doc_starts)] = True
    x = model_inputs(tokens)
    return x.input_ids.contiguous(), x.labels.contiguous(), doc_start


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (0 when both are zero)."""
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff
