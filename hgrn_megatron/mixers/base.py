"""`MixerSpec`: what the framework needs to know about one token mixer, and the counting helpers mixers share.

A description is plain data and functions of the `ModelConfig`; it imports neither torch nor megatron, so the
config, the FLOP model and the `hgrn-model` command can ask it without building anything. Only `layer_spec`
builds megatron objects (its imports live inside it).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hgrn_megatron.partition import PartitionRule

if TYPE_CHECKING:
    from hgrn_megatron.config import ModelConfig

DOCUMENT_MASKS = ("reset", "attention")
POSITION_EMBEDDINGS = ("rope", "none")

# Elementwise FLOPs per feature of a norm: LayerNorm centre, square, normalise, scale, shift (+ reductions) ~ 5;
# RMSNorm ~ 4. Used for the block norms and for any norm inside a mixer.
NORM_FLOPS_PER_FEATURE = {"layernorm": 5, "rmsnorm": 4}


def norm_parameters(kind: str, width: int) -> int:
    """Parameters of a LayerNorm (weight and bias) or RMSNorm (weight) over `width` features."""
    return 2 * width if kind == "layernorm" else width


def linear_parameters(in_features: int, out_features: int, bias: bool) -> int:
    return in_features * out_features + (out_features if bias else 0)


def no_lower_bounds(cfg: ModelConfig) -> int:
    return 0


@dataclass(frozen=True)
class MixerSpec:
    """One token mixer in megatron's `self_attention` slot, described for the rest of the framework.

    layer_spec: cfg -> megatron `ModuleSpec` of a whole `TransformerLayer` with this mixer (the block norms,
        SwiGLU MLP and residuals come from `hgrn_megatron.layer_specs`).
    parameters: cfg -> parameters of one mixer (its block norm excluded); `flops.count_parameters` adds the
        rest and must equal the built model's count.
    forward_flops: (cfg, seq_length) -> forward FLOPs per token of one mixer, by part, in display order.
        "mixer_matmul" (its linear layers) and "attention_scores" are counted as matmuls (what torch's FLOP
        counter sees as mm, the former); any other part ("scan", "elementwise", ...) as elementwise work.
    tp_rules: (pattern, rule) for each of its parameters, the pattern relative to the mixer's slot
        (`decoder.layers.N.self_attention.`), the rule from `hgrn_megatron.partition`.
    document_mask: how document starts reach the mixer, through megatron's `attention_mask` argument when the
        config resets at document boundaries: "reset" = the `doc_start` mask itself, bool [b, s] (the mixer
        clears its state; an explicit attention mask is refused); "attention" = a boolean [b, 1, s, s] mask,
        causal and block-diagonal over documents, True = masked (None: plain causal).
    position_embedding: "rope" (megatron's rotary embedding, handed to every layer) or "none".
    lower_bound_channels: cfg -> channels of the model-level lower-bound table (HGRN §3.2), 0 for none; when
        non-zero the mixer must have `attach_lower_bounds(module)`.
    hf_export: `hgrn-export-hf` can write this mixer's model.
    context_parallel: the mixer is correct on one piece of a sequence split over a context-parallel group
        (the HGRU passes its recurrent state between the pieces; `hgrn_megatron.context_parallel`).
    details: cfg -> a short note for summaries (e.g. the HGRU variant), or None.
    """

    title: str
    description: str
    layer_spec: Callable[[ModelConfig], Any]
    parameters: Callable[[ModelConfig], int]
    forward_flops: Callable[[ModelConfig, int], dict[str, float]]
    tp_rules: tuple[tuple[str, PartitionRule], ...]
    document_mask: str
    position_embedding: str = "none"
    lower_bound_channels: Callable[[ModelConfig], int] = no_lower_bounds
    hf_export: bool = False
    context_parallel: bool = False
    details: Callable[[ModelConfig], str] | None = None

    def __post_init__(self):
        if self.document_mask not in DOCUMENT_MASKS:
            raise ValueError(f"MixerSpec {self.title}: document_mask must be one of {DOCUMENT_MASKS}, "
                             f"got {self.document_mask!r}")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"MixerSpec {self.title}: position_embedding must be one of {POSITION_EMBEDDINGS}, "
                             f"got {self.position_embedding!r}")
