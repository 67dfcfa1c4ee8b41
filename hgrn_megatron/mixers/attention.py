"""megatron-core's causal self-attention with RoPE, the Transformer baseline, described for the framework.

FLOPs: attention scores and the attention-weighted sum are counted over the full s x s square, as megatron's
local attention computes them (no causal halving).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from hgrn_megatron.mixers.base import MixerSpec, linear_parameters
from hgrn_megatron.partition import COLUMN, REPLICATED, ROW

if TYPE_CHECKING:
    from hgrn_megatron.config import ModelConfig

#   softmax per score: scale, max-subtract, exp, sum, divide
SOFTMAX_FLOPS_PER_SCORE = 5


def parameters(cfg: ModelConfig) -> int:
    d, bias = cfg.hidden_size, cfg.add_bias_linear
    return linear_parameters(d, 3 * d, bias) + linear_parameters(d, d, bias)  # QKV, output projection


def forward_flops(cfg: ModelConfig, seq_length: int) -> dict[str, float]:
    """Per token and layer; the scores grow with the sequence length."""
    d = cfg.hidden_size
    return {
        "mixer_matmul": 2.0 * (3 * d * d + d * d),
        "attention_scores": 2.0 * 2 * seq_length * d,  # Q K^T and P V, each 2·s·d per query token
        "elementwise": float(SOFTMAX_FLOPS_PER_SCORE * cfg.num_attention_heads * seq_length),
    }


def layer_spec(cfg: ModelConfig):
    from hgrn_megatron.layer_specs import local_gpt_layer_spec

    return local_gpt_layer_spec(cfg)


ATTENTION = MixerSpec(
    title="Transformer",
    description="megatron-core's causal self-attention with RoPE (the Transformer baseline)",
    layer_spec=layer_spec,
    parameters=parameters,
    forward_flops=forward_flops,
    # megatron's QKV weight is grouped per head, so a contiguous split gives whole heads.
    tp_rules=(
        (r"linear_qkv\.(weight|bias)", COLUMN),
        (r"linear_proj\.weight", ROW),
        (r"linear_proj\.bias", REPLICATED),
    ),
    document_mask="attention",
    position_embedding="rope",
)
