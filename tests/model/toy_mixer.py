"""A test-only token mixer, written the way a new mixer is added: this module plus one registry line.

The running-mean mixer: y = W_o( silu(x W_g) · mean of x W_v over the current document so far ), a per-channel
causal average. W_v, W_g are column-parallel and W_o row-parallel, so a TP rank owns whole channels, and the
average needs no communication. Document starts reach it as the reset mask (bool [b, s]), like the HGRU's.
Registered by the tests with `monkeypatch.setitem(MIXERS, "running_mean", RUNNING_MEAN)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from hgrn_megatron.mixers.base import MixerSpec, linear_parameters
from hgrn_megatron.partition import COLUMN, REPLICATED, ROW

# Elementwise FLOPs per channel: cumulative sum, subtract the sum before the document, divide by the count (3);
# silu (2) and the gate multiply (1).
ELEMENTWISE_FLOPS_PER_CHANNEL = 6


def running_mean(values: torch.Tensor, reset: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values` [s, b, c] over positions 0..t of the document holding t; `reset` bool [b, s] marks
    document starts (None: one document per sequence)."""
    s = values.shape[0]
    positions = torch.arange(s, device=values.device)[:, None]  # [s, 1]
    if reset is None:
        start = torch.zeros_like(positions).expand(s, values.shape[1])
    else:
        start = torch.where(reset.t(), positions, 0).cummax(dim=0).values  # [s, b]: the document's first token
    total = values.cumsum(dim=0)
    before_start = (total - values).gather(0, start[..., None].expand_as(values))
    return (total - before_start) / (positions - start + 1)[..., None].to(values.dtype)


@dataclass
class RunningMeanSubmodules:
    linear_value: type | None = None
    linear_gate: type | None = None
    linear_out: type | None = None


class RunningMeanMixer(MegatronModule):
    """`[s, b, d] -> ([s, b, d], bias | None)` in megatron's `self_attention` slot."""

    def __init__(self, config, submodules: RunningMeanSubmodules, layer_number: int, pg_collection=None,
                 **kwargs):
        super().__init__(config=config)
        tp_group = pg_collection.tp if pg_collection is not None else (
            parallel_state.get_tensor_model_parallel_group())
        d, bias = config.hidden_size, config.add_bias_linear

        def column(spec):
            return build_module(spec, d, d, config=config, init_method=config.init_method, bias=bias,
                                gather_output=False, skip_bias_add=False, tp_group=tp_group)

        self.linear_value = column(submodules.linear_value)
        self.linear_gate = column(submodules.linear_gate)
        self.linear_out = build_module(submodules.linear_out, d, d, config=config,
                                       init_method=config.output_layer_init_method, bias=bias,
                                       input_is_parallel=True, skip_bias_add=True, tp_group=tp_group)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        values, _ = self.linear_value(hidden_states)  # [s, b, d / tp]
        gate, _ = self.linear_gate(hidden_states)
        return self.linear_out(F.silu(gate) * running_mean(values, attention_mask))


def layer_spec(cfg):
    from hgrn_megatron.layer_specs import layer_with_mixer

    submodules = RunningMeanSubmodules(ColumnParallelLinear, ColumnParallelLinear, RowParallelLinear)
    return layer_with_mixer(cfg, ModuleSpec(module=RunningMeanMixer, submodules=submodules))


def parameters(cfg) -> int:
    return 3 * linear_parameters(cfg.hidden_size, cfg.hidden_size, cfg.add_bias_linear)


def forward_flops(cfg, seq_length: int) -> dict[str, float]:
    d = cfg.hidden_size
    return {"mixer_matmul": 2.0 * 3 * d * d, "elementwise": float(ELEMENTWISE_FLOPS_PER_CHANNEL * d)}


RUNNING_MEAN = MixerSpec(
    title="Running mean",
    description="a gated per-channel causal average (test only)",
    layer_spec=layer_spec,
    parameters=parameters,
    forward_flops=forward_flops,
    tp_rules=(
        (r"linear_(value|gate)\.(weight|bias)", COLUMN),
        (r"linear_out\.weight", ROW),
        (r"linear_out\.bias", REPLICATED),
    ),
    document_mask="reset",
)
