"""Analytic parameter count and training FLOPs per token, for presets, MFU and the `hgrn-model info` command.

Conventions (those of the PaLM paper's MFU, Chowdhery et al. 2022, appendix B, extended to the HGRU):
- a matmul of an [m, k] by a [k, n] matrix costs 2·m·k·n FLOPs; the backward pass costs twice the forward
  (the input gradient and the weight gradient are each one matmul of the same size);
- attention scores and the attention-weighted sum are counted over the full s x s square, as megatron's local
  attention computes them (no causal halving);
- elementwise work (gates, scan, norms, activations) is counted as one FLOP per output element per arithmetic
  or transcendental op, following the op sequence of `hgrn_megatron.hgru.HGRU.forward`; it is small next to
  the matmuls (about 0.1 % at d = 2048) but it is what a recurrent mixer does instead of attention;
- the embedding lookup and the cross entropy are not counted.
"""
from __future__ import annotations

from hgrn_megatron.config import ModelConfig

BACKWARD_FACTOR = 2.0  # backward FLOPs / forward FLOPs, for matmuls and (by convention) elementwise work

# Elementwise FLOPs per token, per HGRU channel or feature (see HGRU.forward):
#   gates per channel: sigmoid(-f)·(1-γ) for 1-λ (2); logsigmoid(f) + log1p(-γ), logaddexp(log γ, .) (3),
#   log1p(-(1-λ)) and the select between the two forms of log λ (2)
GATE_FLOPS_PER_CHANNEL = 7
#   input per feature: silu = 2, times (1-λ) = 1
INPUT_FLOPS_PER_FEATURE = 3
#   scan per channel: real exp(g)·h + x = 3; complex exp(g)·(cos θ, sin θ) = 2, complex mul = 6, complex add = 2
SCAN_FLOPS_PER_CHANNEL = {"real": 3, "complex": 10}
#   norm per feature: LayerNorm centre, square, normalise, scale, shift (+ reductions) ~ 5; RMSNorm ~ 4
NORM_FLOPS_PER_FEATURE = {"layernorm": 5, "rmsnorm": 4}
#   output gate per feature: silu = 2, multiply = 1
OUTPUT_GATE_FLOPS_PER_FEATURE = 3
#   SwiGLU per hidden unit: silu = 2, multiply = 1
SWIGLU_FLOPS_PER_UNIT = 3
#   attention softmax per score: scale, max-subtract, exp, sum, divide
SOFTMAX_FLOPS_PER_SCORE = 5


def _norm_params(kind: str, width: int) -> int:
    return 2 * width if kind == "layernorm" else width


def mixer_parameters(cfg: ModelConfig) -> int:
    """Parameters of one token mixer (HGRU or attention), excluding the block norm before it."""
    d, bias = cfg.hidden_size, cfg.add_bias_linear
    if cfg.mixer == "attention":
        qkv, proj = d * 3 * d + (3 * d if bias else 0), d * d + (d if bias else 0)
        return qkv + proj
    width, features = cfg.mixer_width, cfg.mixer_features
    total = d * features + d * width + features * d  # W_i, W_f, W_o
    if bias:
        total += features + width + d
    if cfg.output_gate:
        total += d * features + (features if bias else 0)  # W_g
    if cfg.variant == "complex":
        total += width  # θ
    return total + _norm_params(cfg.mixer_norm, features)


def mlp_parameters(cfg: ModelConfig) -> int:
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    return 3 * d * f + ((2 * f + d) if cfg.add_bias_linear else 0)  # fc1 (gate and up halves), fc2


def count_parameters(cfg: ModelConfig, vocab_size: int) -> int:
    """Exact parameter count of `build_model(cfg, vocab_size)` at TP = 1 (TP splits, never duplicates, them).

    `vocab_size` is the padded vocabulary the model is built with.
    """
    d, L = cfg.hidden_size, cfg.num_layers
    block_norm = _norm_params(cfg.norm, d)
    per_layer = block_norm + mixer_parameters(cfg) + block_norm + mlp_parameters(cfg)
    total = vocab_size * d + L * per_layer + block_norm  # embedding, blocks, final norm
    if not cfg.share_embeddings_and_output_weights:
        total += vocab_size * d  # LM head
    if cfg.mixer == "hgrn" and cfg.use_lower_bound:
        total += L * cfg.mixer_width  # the lower-bound table
    return total


def forward_flops_per_token(cfg: ModelConfig, vocab_size: int, seq_length: int | None = None) -> dict[str, float]:
    """Forward-pass FLOPs per token, by part: matmuls (mixer, MLP, LM head, attention) and elementwise work."""
    s = seq_length or cfg.seq_length
    d, L = cfg.hidden_size, cfg.num_layers
    parts: dict[str, float] = {}
    if cfg.mixer == "attention":
        parts["mixer_matmul"] = L * 2.0 * (3 * d * d + d * d)
        parts["attention_scores"] = L * 2.0 * 2 * s * d  # Q K^T and P V, each 2·s·d per query token
        parts["elementwise"] = L * float(SOFTMAX_FLOPS_PER_SCORE * cfg.num_attention_heads * s)
    else:
        width, features = cfg.mixer_width, cfg.mixer_features
        projections = d * features + d * width + features * d + (d * features if cfg.output_gate else 0)
        parts["mixer_matmul"] = L * 2.0 * projections
        parts["scan"] = L * float(SCAN_FLOPS_PER_CHANNEL[cfg.variant] * width)
        elementwise = GATE_FLOPS_PER_CHANNEL * width + INPUT_FLOPS_PER_FEATURE * features
        elementwise += NORM_FLOPS_PER_FEATURE[cfg.mixer_norm] * features
        if cfg.output_gate:
            elementwise += OUTPUT_GATE_FLOPS_PER_FEATURE * features
        parts["elementwise"] = L * float(elementwise)
    parts["mlp_matmul"] = L * 2.0 * 3 * d * cfg.ffn_hidden_size
    parts["elementwise"] += L * float(SWIGLU_FLOPS_PER_UNIT * cfg.ffn_hidden_size)
    parts["elementwise"] += (2 * L + 1) * float(NORM_FLOPS_PER_FEATURE[cfg.norm] * d)  # block and final norms
    parts["lm_head"] = 2.0 * d * vocab_size
    return parts


def matmul_flops_per_token(cfg: ModelConfig, vocab_size: int, seq_length: int | None = None) -> float:
    """Forward + backward FLOPs per token of the matmuls alone (what a FLOP counter over mm ops measures)."""
    parts = forward_flops_per_token(cfg, vocab_size, seq_length)
    fwd = sum(v for k, v in parts.items() if k in ("mixer_matmul", "attention_scores", "mlp_matmul", "lm_head"))
    return (1.0 + BACKWARD_FACTOR) * fwd


def flops_per_token(cfg: ModelConfig, vocab_size: int, seq_length: int | None = None) -> float:
    """Training (forward + backward) FLOPs per token: every matmul, the scan, gates, norms and the LM head."""
    return (1.0 + BACKWARD_FACTOR) * sum(forward_flops_per_token(cfg, vocab_size, seq_length).values())
