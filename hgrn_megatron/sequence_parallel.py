"""Megatron sequence parallelism for the HGRN model: the pieces megatron-core leaves to its caller.

With `TransformerConfig.sequence_parallel` megatron-core itself splits the residual stream along the sequence
over the TP ranks: the embedding scatters it, every block norm and residual add runs on this rank's
`[s / tp, b, d]` share, the column-parallel linears all-gather the sequence before their matmul (saving only
the share for the backward pass, where they gather it again) and the row-parallel linears reduce-scatter after
theirs; the output layer gathers before the logits. The HGRU's own projections are those same megatron linears
(`hgrn_megatron/hgru.py`). Three things around that are this module's:

- `sequence_parallel_block_spec`: the block norms. Without Apex or Transformer Engine megatron builds torch's
  LayerNorm/RMSNorm through `WrappedTorchNorm`, which refuses sequence parallelism only because it does not mark
  its weights; the norm is token-local and runs unchanged on a sequence share. This builds the same torch norm
  and marks its parameters `sequence_parallel`, as megatron's fused norms do.
- `sum_sequence_parallel_gradients`: a parameter marked `sequence_parallel` (those norms, row-parallel biases)
  is replicated but sees only this rank's tokens, so its gradient is a partial sum over the TP group. megatron
  sums them in `finalize_model_grads`, which belongs to its own DDP; DeepSpeed never calls it, so a gradient
  hook sums each such gradient over the TP group before it is accumulated (and before DeepSpeed reduces it
  over DP). Do not combine with megatron's `finalize_model_grads`, which would sum them twice.
- `install_cpu_support`: a shim, only on a machine without CUDA, around the two things megatron's
  sequence-parallel code takes from a GPU (nothing is installed when CUDA is available):
  1. the device of its communication buffers: `GlobalMemoryBuffer.get_tensor`, the gather/reduce-scatter
     outputs of `tensor_parallel.mappings` and the input-gradient buffer of
     `LinearWithGradAccumulationAndAsyncCommunication` are allocated on `torch.cuda.current_device()`, which
     raises without CUDA: it answers the CPU.
  2. the CUDA RNG tracker: megatron runs the sequence-parallel region inside
     `get_cuda_rng_tracker().fork()` (so dropout on different shares draws differently); the CUDA states are
     seeded by `model_parallel_cuda_manual_seed`, which needs CUDA. On CPU the fork gets an empty state to
     switch to (its get/set are no-ops there, `runtime_env.patch_for_cpu`); the CPU generator, the one that
     matters, is untouched. With dropout 0 (this model) no random number is drawn either way.
  Collectives need no shim: gloo (torch 2.13) runs `all_gather_into_tensor` and `reduce_scatter_tensor`,
  synchronous and asynchronous, in fp32 and bf16 (measured).
"""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.distributed as dist


class SequenceParallelTorchNorm:
    """torch's LayerNorm / RMSNorm as megatron's `WrappedTorchNorm` builds it, with its parameters marked
    `sequence_parallel` (see the module docstring). Same signature as megatron's norm modules."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        plain = copy.copy(config)  # shallow: only the flag WrappedTorchNorm checks differs
        plain.sequence_parallel = False
        norm = WrappedTorchNorm(plain, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def _with_sequence_parallel_norms(spec):
    """`spec` with every torch-norm submodule built by `SequenceParallelTorchNorm`; other norms (Apex, TE) mark
    their own parameters and are kept."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    replaced = {}
    for field in dataclasses.fields(spec.submodules):
        value = getattr(spec.submodules, field.name)
        if value is WrappedTorchNorm:
            replaced[field.name] = SequenceParallelTorchNorm
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, **replaced))


def sequence_parallel_block_spec(layer_spec, num_layers: int):
    """A `TransformerBlock` spec of `num_layers` layers of `layer_spec` whose block norms and final norm run on a
    sequence share (what megatron builds from a layer spec, with the norm chosen here)."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import (
        LayerNormImpl,
        TransformerBlock,
        TransformerBlockSubmodules,
    )

    layer = _with_sequence_parallel_norms(layer_spec)
    final = SequenceParallelTorchNorm if LayerNormImpl is WrappedTorchNorm else LayerNormImpl
    return ModuleSpec(module=TransformerBlock,
                      submodules=TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=final))


def sum_sequence_parallel_gradients(module: torch.nn.Module, tp_group) -> int:
    """Register, on every parameter of `module` marked `sequence_parallel`, a hook that sums its gradient over
    `tp_group`; returns how many. Every TP rank runs the same backward graph, so the hooks fire in the same
    order on each."""
    hooked = 0
    for param in module.parameters():
        if getattr(param, "sequence_parallel", False) and param.requires_grad:
            param.register_hook(lambda grad: _summed(grad, tp_group))
            hooked += 1
    return hooked


def _summed(grad: torch.Tensor, group) -> torch.Tensor:
    grad = grad.clone(memory_format=torch.contiguous_format)  # never change a tensor autograd may still hold
    dist.all_reduce(grad, group=group)
    return grad


_cpu_support_installed = False


def install_cpu_support() -> None:
    """The CPU shim of the module docstring; does nothing when CUDA is available. Idempotent."""
    global _cpu_support_installed
    if torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as megatron_random

    from hgrn_megatron.runtime_env import patch_for_cpu

    patch_for_cpu()  # the RNG tracker's CUDA state get/set become no-ops
    tracker = megatron_random.get_cuda_rng_tracker()
    tracker.states_.setdefault(megatron_random._MODEL_PARALLEL_RNG_TRACKER_NAME, None)
    if not _cpu_support_installed:
        _cpu_support_installed = True
        # Without CUDA the original always raises; megatron only passes the answer as `device=`.
        torch.cuda.current_device = lambda: torch.device("cpu")
