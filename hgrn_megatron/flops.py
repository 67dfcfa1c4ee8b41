"""Analytic parameter count and training FLOPs per token, for presets, MFU and the `hgrn-model info` command.

Conventions (those of the PaLM paper's MFU, Chowdhery et al. 2022, appendix B, extended to the HGRU):
- a matmul of an [m, k] by a [k, n] matrix costs 2·m·k·n FLOPs; the backward pass costs twice the forward
  (the input gradient and the weight gradient are each one matmul of the same size);
- elementwise work (gates, scan, norms, activations) is counted as one FLOP per output element per arithmetic
  or transcendental op; it is small next to the matmuls (about 0.1 % at d = 2048) but it is what a recurrent
  mixer does instead of attention;
- the embedding lookup and the cross entropy are not counted.
Each mixer's own formulas live in its description (`hgrn_megatron.mixers`, `MixerSpec.parameters` and
`MixerSpec.forward_flops`); this module adds the embedding, MLP, norms, lower-bound table and LM head.
"""
from __future__ import annotations

from hgrn_megatron.config import ModelConfig
from hgrn_megatron.mixers import get_mixer
from hgrn_megatron.mixers.base import NORM_FLOPS_PER_FEATURE, norm_parameters

BACKWARD_FACTOR = 2.0  # backward FLOPs / forward FLOPs, for matmuls and (by convention) elementwise work
#   SwiGLU per hidden unit: silu = 2, multiply = 1
SWIGLU_FLOPS_PER_UNIT = 3
MATMUL_PARTS = ("mixer_matmul", "attention_scores", "mlp_matmul", "lm_head")  # the rest is elementwise work


def mixer_parameters(cfg: ModelConfig) -> int:
    """Parameters of one token mixer, excluding the block norm before it."""
    return get_mixer(cfg.mixer).parameters(cfg)


def mlp_parameters(cfg: ModelConfig) -> int:
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    return 3 * d * f + ((2 * f + d) if cfg.add_bias_linear else 0)  # fc1 (gate and up halves), fc2


def count_parameters(cfg: ModelConfig, vocab_size: int) -> int:
    """Exact parameter count of `build_model(cfg, vocab_size)` at TP = 1 (TP splits, never duplicates, them).

    `vocab_size` is the padded vocabulary the model is built with.
    """
    d, L = cfg.hidden_size, cfg.num_layers
    block_norm = norm_parameters(cfg.norm, d)
    per_layer = block_norm + mixer_parameters(cfg) + block_norm + mlp_parameters(cfg)
    total = vocab_size * d + L * per_layer + block_norm  # embedding, blocks, final norm
    if not cfg.share_embeddings_and_output_weights:
        total += vocab_size * d  # LM head
    return total + L * get_mixer(cfg.mixer).lower_bound_channels(cfg)  # the lower-bound table, if any


def forward_flops_per_token(cfg: ModelConfig, vocab_size: int, seq_length: int | None = None) -> dict[str, float]:
    """Forward-pass FLOPs per token, by part: the mixer's (matmuls, attention scores, scan, elementwise), the
    MLP's matmuls and the LM head; block norms and SwiGLU are added to the elementwise part."""
    s = seq_length or cfg.seq_length
    d, L = cfg.hidden_size, cfg.num_layers
    parts = {part: L * value for part, value in get_mixer(cfg.mixer).forward_flops(cfg, s).items()}
    parts.setdefault("elementwise", 0.0)
    parts["mlp_matmul"] = L * 2.0 * 3 * d * cfg.ffn_hidden_size
    parts["elementwise"] += L * float(SWIGLU_FLOPS_PER_UNIT * cfg.ffn_hidden_size)
    parts["elementwise"] += (2 * L + 1) * float(NORM_FLOPS_PER_FEATURE[cfg.norm] * d)  # block and final norms
    parts["lm_head"] = 2.0 * d * vocab_size
    return parts


def matmul_flops_per_token(cfg: ModelConfig, vocab_size: int, seq_length: int | None = None) -> float:
    """Forward + backward FLOPs per token of the matmuls alone (what a FLOP counter over mm ops measures)."""
    parts = forward_flops_per_token(cfg, vocab_size, seq_length)
    fwd = sum(v for k, v in parts.items() if k in MATMUL_PARTS)
    return (1.0 + BACKWARD_FACTOR) * fwd


def flops_per_token(cfg: ModelConfig, vocab_size: int, seq_length: int | None = None) -> float:
    """Training (forward + backward) FLOPs per token: every matmul, the scan, gates, norms and the LM head."""
    return (1.0 + BACKWARD_FACTOR) * sum(forward_flops_per_token(cfg, vocab_size, seq_length).values())
