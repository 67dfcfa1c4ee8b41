"""The model section of the run config: architecture, HGRN ablation switches and the scan backend.

Pure pydantic (no megatron import), so a config can be checked before any process group starts.
`hgrn_megatron.model.transformer_config_from` turns it into megatron-core's `TransformerConfig`.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from hgrn_megatron.config_base import ConfigError, ConfigNode
from hgrn_megatron.mixers import MIXERS, registered_mixers

# What each form sets for the switches a config leaves out (mixer_bias left None follows add_bias_linear).
FORMS: dict[str, dict[str, Any]] = {
    "reference_code": {"output_gate_activation": "silu", "output_gate_placement": "after_norm"},
    "paper": {"output_gate_activation": "sigmoid", "output_gate_placement": "before_norm", "mixer_bias": True,
              "mixer_norm": "layernorm"},
}


def _fill_from_form(data: Any) -> Any:
    """The switches `data` leaves out, from its form (an explicit switch wins)."""
    if not isinstance(data, dict) or data.get("form", "reference_code") not in FORMS:
        return data  # not a dict, or an unknown form: the field validators say what is wrong
    return {**FORMS[data.get("form", "reference_code")], **data}


class ModelConfig(ConfigNode):
    """One HGRN (or Transformer-baseline) language model. Defaults are the `tiny` preset."""

    # ---------------------------------------------------------------- which model
    preset: str | None = Field(
        None, description="Name in `hgrn_megatron.presets.PRESETS`; fills every field not given explicitly."
    )
    mixer: str = Field(
        "hgrn",
        description="Token mixer, a name in `hgrn_megatron.mixers.MIXERS`: 'hgrn' (the HGRU) or 'attention' "
        "(megatron-core's own causal self-attention with RoPE, the Transformer baseline). Everything else "
        "(embeddings, MLP, norms, head) is identical.",
    )

    # ---------------------------------------------------------------- sizes
    hidden_size: int = Field(64, gt=0, description="Model width d.")
    num_layers: int = Field(2, gt=0, description="Number of (mixer + MLP) blocks.")
    ffn_hidden_size: int = Field(128, gt=0, description="Width of the SwiGLU MLP (per half of the gated unit).")
    num_attention_heads: int = Field(
        4, gt=0, description="Heads of the attention baseline; megatron requires it for HGRN too (unused there)."
    )
    seq_length: int = Field(128, gt=0, description="Training sequence length in tokens (model input length).")

    # ---------------------------------------------------------------- HGRU
    variant: Literal["complex", "real"] = Field(
        "complex",
        description="complex: d channels with a learned phase θ (2·d features); real: expand_ratio·d real channels.",
    )
    expand_ratio: int = Field(1, ge=1, description="Real variant only: recurrence width = expand_ratio · d.")
    use_lower_bound: bool = Field(
        True, description="Learned per-layer forget-gate lower bounds (HGRN §3.2); off: γ = 0 in every layer."
    )
    output_gate: bool = Field(True, description="Multiply the recurrence output by an output gate act(x W_g).")
    form: Literal["reference_code", "paper"] = Field(
        "reference_code",
        description="Which of the two published forms of the HGRU the switches below default to: "
        "'reference_code' (the authors' code: silu gate after the norm, no mixer biases) or 'paper' (HGRN §3.2: "
        "sigmoid gate before a LayerNorm, biases on every mixer projection). An explicit switch wins.",
    )
    output_gate_activation: Literal["silu", "sigmoid"] = Field(
        "silu", description="The output gate's activation (reference code: silu; paper: sigmoid)."
    )
    output_gate_placement: Literal["after_norm", "before_norm"] = Field(
        "after_norm",
        description="after_norm: Norm(h)·act(g) (reference code); before_norm: Norm(act(g)·h) (paper).",
    )
    mixer_bias: bool | None = Field(
        None, description="Biases on the HGRU's projections W_i, W_f, W_g, W_o (paper: yes; reference code: "
        "no). None (the reference-code form's default): as add_bias_linear."
    )
    mixer_norm: Literal["layernorm", "rmsnorm"] = Field(
        "layernorm", description="Norm over the recurrence features before the output gate (authors: LayerNorm)."
    )
    reset_at_document_boundary: bool = Field(
        False,
        description="Clear the recurrent state (attention baseline: block the attention) at each document "
        "start given by the data pipeline's doc_start mask. Off: one stream per sequence, as in the paper.",
    )
    scan_backend: Literal["auto", "cpu", "torch", "triton"] = Field(
        "auto", description="hgrn_scan backend: auto = Triton on CUDA tensors, the fused CPU kernel on CPU "
        "(the torch path where no C++ compiler can build it)."
    )

    # ---------------------------------------------------------------- shared by both mixers
    norm: Literal["rmsnorm", "layernorm"] = Field("rmsnorm", description="Pre-mixer, pre-MLP and final norms.")
    norm_epsilon: float = Field(1e-5, gt=0, description="Epsilon of every norm (block norms and mixer norm).")
    init_method_std: float = Field(
        0.02, gt=0, description="Std of the normal init; output projections are scaled by 1/sqrt(2·num_layers)."
    )
    add_bias_linear: bool = Field(False, description="Biases in every linear layer (mixer and MLP).")
    share_embeddings_and_output_weights: bool = Field(False, description="Tie the input embedding and LM head.")
    rotary_base: int = Field(10000, gt=0, description="RoPE base of the attention baseline.")

    # ---------------------------------------------------------------- activation recompute (not the model)
    recompute_granularity: Literal["full"] | None = Field(
        None, description="'full': keep only each recomputed block's input in the forward pass and run the block "
        "again in the backward (megatron-core's activation checkpointing); None: keep every activation."
    )
    recompute_method: Literal["uniform", "block"] = Field(
        "uniform", description="uniform: every layer, in groups of recompute_num_layers (one input kept per "
        "group); block: only the first recompute_num_layers layers."
    )
    recompute_num_layers: int = Field(1, gt=0, description="Group size (uniform) or layer count (block).")
    loss_chunk_tokens: int | None = Field(
        8192, gt=0, description="When a micro-batch holds more tokens than this, compute the LM head and the loss "
        "this many tokens at a time, recomputing the logits in the backward pass (`chunked_loss.py`): the same "
        "loss and gradients without the fp32 logits of the whole micro-batch in memory (145 KiB/token at a 32 k "
        "vocabulary), for one more head matmul per token. None: never."
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset"):
            from hgrn_megatron.presets import get_preset

            try:
                base = get_preset(data["preset"])
            except KeyError as err:
                raise ValueError(err.args[0]) from None
            data = {**base, **data}
        return _fill_from_form(data)

    @field_validator("mixer")
    @classmethod
    def _registered_mixer(cls, name: str) -> str:
        if name not in MIXERS:
            raise ValueError(f"not a registered mixer; choose one of: {registered_mixers()}")
        return name

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.variant == "complex" and self.expand_ratio != 1:
            raise ValueError(
                f"expand_ratio={self.expand_ratio} applies to the real variant only "
                "(the complex variant's width is fixed at d channels = 2·d features)"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.recompute_granularity and self.recompute_num_layers > self.num_layers:
            raise ValueError(
                f"recompute_num_layers ({self.recompute_num_layers}) exceeds num_layers ({self.num_layers})"
            )
        if (self.recompute_granularity and self.recompute_method == "uniform"
                and self.num_layers % self.recompute_num_layers):
            # megatron-core runs groups [i, i + n) without clamping the last one: an IndexError at the first step
            raise ValueError(
                f"recompute_method 'uniform' needs recompute_num_layers ({self.recompute_num_layers}) to divide "
                f"num_layers ({self.num_layers}); or use recompute_method 'block'"
            )
        return self

    @property
    def mixer_biases(self) -> bool:
        """Whether the HGRU's projections have biases (`mixer_bias`, or `add_bias_linear` when that is None)."""
        return self.add_bias_linear if self.mixer_bias is None else self.mixer_bias

    def validate_parallel(self, tp_size: int) -> None:
        """Raise ConfigError unless `tp_size` tensor-parallel ranks can split this model evenly."""
        if tp_size < 1:
            raise ConfigError(f"model: tensor-parallel size must be >= 1 (got {tp_size})")
        # A TP rank owns whole HGRU channels, whole heads and whole MLP columns; with hidden_size divisible,
        # the HGRU width (hidden_size or expand_ratio x hidden_size) is too.
        checks = {
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "ffn_hidden_size": self.ffn_hidden_size,
        }
        problems = [
            f"model.{name}: {value} is not divisible by the tensor-parallel size {tp_size}"
            for name, value in checks.items()
            if value % tp_size
        ]
        if problems:
            raise ConfigError("\n".join(problems))
