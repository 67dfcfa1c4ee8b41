"""Configuration of an exported HGRN language model (Hierarchically Gated Recurrent Network, Qin et al., NeurIPS 2023).

This file is copied into every exported model directory and must stay self-contained: it imports only
transformers. Field names follow transformers' conventions where one exists (`num_hidden_layers`,
`intermediate_size`, `tie_word_embeddings`) and the training framework's model config otherwise.
"""
from __future__ import annotations

try:  # transformers >= 5 renamed the base class; the old name is kept as an alias for a while
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import PretrainedConfig as _BaseConfig

VARIANTS = ("complex", "real")
NORMS = ("rmsnorm", "layernorm")
GATE_ACTIVATIONS = ("silu", "sigmoid")
GATE_PLACEMENTS = ("after_norm", "before_norm")


class HGRNConfig(_BaseConfig):
    """Hyper-parameters of `HGRNForCausalLM`.

    Args:
        vocab_size: number of token ids the model reads and predicts (the tokenizer's vocabulary, no padding).
        hidden_size: model width d.
        num_hidden_layers: number of blocks (token mixer + SwiGLU MLP, each behind a pre-norm residual).
        intermediate_size: width of the SwiGLU MLP (gate and up projections each have this many outputs).
        variant: "complex" (the paper's HGRU: a complex state per channel, learned phase theta) or "real".
        expand_ratio: real variant only: the recurrent state has `hidden_size * expand_ratio` channels.
        use_lower_bound: learn the per-layer forget-gate lower bounds (one `[layers, channels]` table); off means 0.
        output_gate: multiply the recurrent output by an output gate act(x W_g) before the output projection.
        output_gate_activation: the gate's act, "silu" (the authors' code) or "sigmoid" (the paper).
        output_gate_placement: "after_norm": Norm(h) * act(g) (the authors' code); "before_norm": Norm(act(g) * h)
            (the paper, section 3.2).
        mixer_norm: norm over the recurrent output features before the output projection ("layernorm" in the
            paper's code, "rmsnorm" as an option).
        reset_at_document_boundary: clear the recurrent state at the first token of every document. Without an
            explicit `doc_start` mask the model treats the token after `eos_token_id` as a document start.
        norm: the block norms (pre-mixer, pre-MLP and final): "rmsnorm" or "layernorm".
        norm_epsilon: epsilon of every norm.
        mixer_bias: the mixer's linear projections have biases.
        mlp_bias: the MLP's linear projections have biases.
        initializer_range: std of the normal initialisation of projections and embeddings (fresh models only).
        scan_backend: "auto" (the project's Triton kernels on CUDA when importable, else the torch scan) or "torch".
        training_seq_length: the sequence length the model was trained at (information: longer inputs run, their
            quality is whatever the model learned to carry in its state).
        max_position_embeddings: None. The model has no position embeddings and a constant-size recurrent state,
            so no length limits it; transformers' `generate` caps `max_length` at this value and warns once a
            sequence reaches it, which for a recurrent model would only be a false alarm.
    """

    model_type = "hgrn_megatron"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1024,
        num_hidden_layers: int = 24,
        intermediate_size: int = 2816,
        variant: str = "complex",
        expand_ratio: float = 1,
        use_lower_bound: bool = True,
        output_gate: bool = True,
        output_gate_activation: str = "silu",
        output_gate_placement: str = "after_norm",
        mixer_norm: str = "layernorm",
        reset_at_document_boundary: bool = False,
        norm: str = "rmsnorm",
        norm_epsilon: float = 1e-5,
        mixer_bias: bool = False,
        mlp_bias: bool = False,
        initializer_range: float = 0.02,
        scan_backend: str = "auto",
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        training_seq_length: int | None = None,
        max_position_embeddings: int | None = None,
        **kwargs,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"HGRNConfig.variant must be one of {VARIANTS}, got {variant!r}")
        for field, value in (("mixer_norm", mixer_norm), ("norm", norm)):
            if value not in NORMS:
                raise ValueError(f"HGRNConfig.{field} must be one of {NORMS}, got {value!r}")
        if output_gate_activation not in GATE_ACTIVATIONS:
            raise ValueError(f"HGRNConfig.output_gate_activation must be one of {GATE_ACTIVATIONS}, "
                             f"got {output_gate_activation!r}")
        if output_gate_placement not in GATE_PLACEMENTS:
            raise ValueError(f"HGRNConfig.output_gate_placement must be one of {GATE_PLACEMENTS}, "
                             f"got {output_gate_placement!r}")
        if scan_backend not in ("auto", "torch"):
            raise ValueError(f"HGRNConfig.scan_backend must be 'auto' or 'torch', got {scan_backend!r}")
        inner = int(hidden_size * expand_ratio) if variant == "real" else hidden_size
        if variant == "real" and inner != hidden_size * expand_ratio:
            raise ValueError(f"HGRNConfig: hidden_size * expand_ratio = {hidden_size * expand_ratio} is not whole")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.intermediate_size = intermediate_size
        self.variant = variant
        self.expand_ratio = expand_ratio
        self.use_lower_bound = use_lower_bound
        self.output_gate = output_gate
        self.output_gate_activation = output_gate_activation
        self.output_gate_placement = output_gate_placement
        self.mixer_norm = mixer_norm
        self.reset_at_document_boundary = reset_at_document_boundary
        self.norm = norm
        self.norm_epsilon = norm_epsilon
        self.mixer_bias = mixer_bias
        self.mlp_bias = mlp_bias
        self.initializer_range = initializer_range
        self.scan_backend = scan_backend
        self.training_seq_length = training_seq_length
        self.max_position_embeddings = max_position_embeddings
        self.use_cache = use_cache
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def recurrent_channels(self) -> int:
        """Channels of each layer's recurrent state (complex channels for the complex variant)."""
        return int(self.hidden_size * self.expand_ratio) if self.variant == "real" else self.hidden_size
