"""The HGRU mixer (`hgrn_megatron.hgru`) described for the framework: widths, layer spec, counts, TP rules.

FLOP conventions are those of `hgrn_megatron.flops`; the elementwise counts follow the op sequence of
`HGRU.forward` (one FLOP per output element per arithmetic or transcendental op).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from hgrn_megatron.mixers.base import NORM_FLOPS_PER_FEATURE, MixerSpec, linear_parameters, norm_parameters
from hgrn_megatron.partition import CHANNEL, COLUMN, REPLICATED, ROW

if TYPE_CHECKING:
    from hgrn_megatron.config import ModelConfig

# Elementwise FLOPs per token, per HGRU channel or feature (see HGRU.forward):
#   gates per channel: sigmoid(-f)·(1-γ) for 1-λ (2); logsigmoid(f) + log1p(-γ), logaddexp(log γ, .) (3),
#   log1p(-(1-λ)) and the select between the two forms of log λ (2)
GATE_FLOPS_PER_CHANNEL = 7
#   input per feature: silu = 2, times (1-λ) = 1
INPUT_FLOPS_PER_FEATURE = 3
#   scan per channel: real exp(g)·h + x = 3; complex exp(g)·(cos θ, sin θ) = 2, complex mul = 6, complex add = 2
SCAN_FLOPS_PER_CHANNEL = {"real": 3, "complex": 10}
#   output gate per feature: the activation (silu = 2: sigmoid and multiply; sigmoid = 1), multiply = 1
OUTPUT_GATE_FLOPS_PER_FEATURE = {"silu": 3, "sigmoid": 2}


def hgru_width(variant: str, expand_ratio: int, hidden_size: int) -> int:
    """Recurrence channels of one HGRU (each complex channel holds a real and an imaginary part)."""
    return hidden_size if variant == "complex" else expand_ratio * hidden_size


def hgru_features(variant: str, expand_ratio: int, hidden_size: int) -> int:
    """Real-valued features of one HGRU's state: the width of W_i, W_g, the mixer norm and W_o's input."""
    width = hgru_width(variant, expand_ratio, hidden_size)
    return 2 * width if variant == "complex" else width


def _sizes(cfg: ModelConfig) -> tuple[int, int]:
    return (hgru_width(cfg.variant, cfg.expand_ratio, cfg.hidden_size),
            hgru_features(cfg.variant, cfg.expand_ratio, cfg.hidden_size))


def parameters(cfg: ModelConfig) -> int:
    d, bias = cfg.hidden_size, cfg.mixer_biases
    width, features = _sizes(cfg)
    total = linear_parameters(d, features, bias) + linear_parameters(d, width, bias)  # W_i, W_f
    total += linear_parameters(features, d, bias)  # W_o
    if cfg.output_gate:
        total += linear_parameters(d, features, bias)  # W_g
    if cfg.variant == "complex":
        total += width  # θ
    return total + norm_parameters(cfg.mixer_norm, features)


def forward_flops(cfg: ModelConfig, seq_length: int) -> dict[str, float]:
    """Per token and layer; independent of the sequence length."""
    d = cfg.hidden_size
    width, features = _sizes(cfg)
    projections = d * features + d * width + features * d + (d * features if cfg.output_gate else 0)
    elementwise = GATE_FLOPS_PER_CHANNEL * width + INPUT_FLOPS_PER_FEATURE * features
    elementwise += NORM_FLOPS_PER_FEATURE[cfg.mixer_norm] * features
    if cfg.output_gate:
        elementwise += OUTPUT_GATE_FLOPS_PER_FEATURE[cfg.output_gate_activation] * features
    return {
        "mixer_matmul": 2.0 * projections,
        "scan": float(SCAN_FLOPS_PER_CHANNEL[cfg.variant] * width),
        "elementwise": float(elementwise),
    }


def lower_bound_channels(cfg: ModelConfig) -> int:
    return _sizes(cfg)[0] if cfg.use_lower_bound else 0


def details(cfg: ModelConfig) -> str:
    return cfg.variant if cfg.form == "reference_code" else f"{cfg.variant}, {cfg.form} form"


def layer_spec(cfg: ModelConfig):
    """megatron's local GPT layer with the HGRU, on megatron's local column/row-parallel linears, in the
    `self_attention` slot."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec

    from hgrn_megatron.hgru import HGRU, HGRUOptions, HGRUSubmodules, TPFeatureNorm
    from hgrn_megatron.layer_specs import layer_with_mixer

    options = HGRUOptions(variant=cfg.variant, expand_ratio=cfg.expand_ratio, mixer_norm=cfg.mixer_norm,
                          scan_backend=cfg.scan_backend, gate_activation=cfg.output_gate_activation,
                          gate_placement=cfg.output_gate_placement, bias=cfg.mixer_biases)
    submodules = HGRUSubmodules(
        linear_in=ColumnParallelLinear,
        linear_forget=ColumnParallelLinear,
        linear_gate=ColumnParallelLinear if cfg.output_gate else None,
        linear_out=RowParallelLinear,
        norm=TPFeatureNorm,
    )
    return layer_with_mixer(cfg, ModuleSpec(module=HGRU, params={"options": options}, submodules=submodules))


HGRN = MixerSpec(
    title="HGRN",
    description="the HGRU, a gated linear recurrence with per-layer forget-gate lower bounds",
    layer_spec=layer_spec,
    parameters=parameters,
    forward_flops=forward_flops,
    # A TP rank owns whole channels: both parts of its complex channels, their gates, θ and norm features.
    tp_rules=(
        (r"linear_(in|forget|gate)\.(weight|bias)", COLUMN),
        (r"(theta|norm\.weight|norm\.bias)", CHANNEL),
        (r"linear_out\.weight", ROW),
        (r"linear_out\.bias", REPLICATED),
    ),
    document_mask="reset",
    position_embedding="none",
    lower_bound_channels=lower_bound_channels,
    hf_export=True,
    context_parallel=True,
    details=details,
)
