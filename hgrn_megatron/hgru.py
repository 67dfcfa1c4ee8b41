"""The HGRU token mixer: a megatron-core module for the `self_attention` slot of a `TransformerLayer`.

The Hierarchically Gated Recurrent Unit of Qin, Yang and Zhong, "Hierarchically Gated Recurrent Neural
Network for Sequence Modeling" (NeurIPS 2023), §3, as the authors' reference code computes it
(OpenNLPLab/HGRN, `Hgru1d` for the complex variant, `HgruRealV6`/`Hgru1_real_1d` for the real one):

    i = x W_i                          complex: d channels x (re, im); real: expand_ratio·d channels
    f = x W_f                          one forget logit per channel
    λ = γ_k + (1 − γ_k) · σ(f)         γ_k: the lower bound of layer k (0 in layer 0)
    h_t = λ_t e^{iθ} h_{t−1} + (1 − λ_t) silu(i_t)      θ: learned per-channel phase (complex only)
    y = W_o( Norm([Re h, Im h]) · silu(x W_g) )

The paper's §3.2 form differs in three places, each a switch (`HGRUOptions`, `ModelConfig.form`): a sigmoid
output gate, the gate before the norm (y = W_o LayerNorm(σ(x W_g) ⊙ [Re h, Im h])), biases on every
projection. docs/MODEL.md sets the two side by side.

Tensor parallelism: W_i, W_f, W_g are column-parallel and W_o row-parallel, so a TP rank owns whole channels:
both parts of each of its complex channels, their forget gates, their θ and their lower-bound column.
To make contiguous column splits line up with channels, every 2·d-wide tensor is laid out channel-major
(re_0, im_0, re_1, im_1, ...) instead of the authors' [re_0..re_{d-1}, im_0..im_{d-1}]; the norm over all
2·d features is invariant to that permutation, so the model is the authors' up to a fixed relabelling of the
W_i / W_g / W_o / norm rows. The norm's statistics span every rank's features: they are all-reduced in the
forward *and* the backward pass (`hgru_ops.gated_norm`).

Context parallelism: with a CP group of more than one rank, each rank holds a contiguous piece of every
sequence and the scan takes the recurrent state the earlier pieces hand over (`context_parallel.py`);
everything else in the layer is token-local.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

from hgrn_megatron.context_parallel import context_parallel_scan
from hgrn_megatron.fp32_params import fp32_view, keep_fp32
from hgrn_megatron.hgru_ops import forget_gate, gated_input, gated_norm
from hgrn_megatron.mixers.hgrn import hgru_features, hgru_width


# ------------------------------------------------------------------------------------------ TP-aware norm
class TPFeatureNorm(MegatronModule):
    """LayerNorm or RMSNorm over a feature dimension that is split across the TP ranks.

    Holds this rank's slice of the weight (and bias) and normalises with statistics of all `hidden_size`
    features, computed in fp32. At TP = 1 it is an ordinary LayerNorm / RMSNorm.
    """

    def __init__(self, config, hidden_size: int, *, kind: str = "layernorm", eps: float = 1e-5, tp_group=None,
                 **kwargs):
        super().__init__(config=config)
        if kind not in ("layernorm", "rmsnorm"):
            raise ValueError(f"TPFeatureNorm: kind must be 'layernorm' or 'rmsnorm' (got {kind!r})")
        self.tp_group = tp_group if tp_group is not None else parallel_state.get_tensor_model_parallel_group()
        tp = dist.get_world_size(self.tp_group)
        if hidden_size % tp:
            raise ValueError(f"TPFeatureNorm: {hidden_size} features do not split over {tp} TP ranks")
        self.kind, self.eps, self.hidden_size = kind, eps, hidden_size
        local = hidden_size // tp
        self.weight = torch.nn.Parameter(torch.ones(local, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)
        if kind == "layernorm":
            self.bias = torch.nn.Parameter(torch.zeros(local, dtype=config.params_dtype))
            set_tensor_model_parallel_attributes(self.bias, True, 0, 1)
        else:
            self.bias = None

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None, *, activation: str = "silu",
                placement: str = "after_norm") -> torch.Tensor:
        """Norm(x)·act(gate) (placement "before_norm": Norm(act(gate)·x)), or Norm(x) without a gate, in x's
        dtype (computed in fp32; `hgru_ops.gated_norm`: statistics all-reduced over the TP group forward and
        backward, torch's fused kernels at TP = 1)."""
        return gated_norm(x, gate, self.weight, self.bias, self.eps, tp_group=self.tp_group,
                          hidden_size=self.hidden_size, activation=activation, placement=placement)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Weight and bias are split along the feature axis (by default custom tensors count as replicated)."""
        state = {}
        self._save_to_state_dict(state, "", keep_vars=True)
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {"weight": 0, "bias": 0}, sharded_offsets, tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )


# ------------------------------------------------------------------------------------------ the mixer
@dataclass
class HGRUSubmodules:
    """Building blocks of an HGRU, in megatron's ModuleSpec style (local and TE linears are interchangeable)."""

    linear_in: ModuleSpec | type | None = None  # column-parallel, d -> features
    linear_forget: ModuleSpec | type | None = None  # column-parallel, d -> channels
    linear_gate: ModuleSpec | type | None = None  # column-parallel, d -> features (None: no output gate)
    linear_out: ModuleSpec | type | None = None  # row-parallel, features -> d
    norm: ModuleSpec | type | None = TPFeatureNorm


@dataclass(frozen=True)
class HGRUOptions:
    """The HGRU's ablation switches (from `ModelConfig`); each is a real code path."""

    variant: str = "complex"  # "complex" | "real"
    expand_ratio: int = 1  # real variant: channels = expand_ratio · d
    mixer_norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    scan_backend: str = "auto"  # passed to hgrn_scan
    gate_activation: str = "silu"  # "silu" (reference code) | "sigmoid" (paper)
    gate_placement: str = "after_norm"  # Norm(h)·act(g) | "before_norm": Norm(act(g)·h) (paper)
    bias: bool | None = None  # biases on W_i, W_f, W_g, W_o; None: megatron's add_bias_linear

    def width(self, hidden_size: int) -> int:
        return hgru_width(self.variant, self.expand_ratio, hidden_size)

    def features(self, hidden_size: int) -> int:
        return hgru_features(self.variant, self.expand_ratio, hidden_size)


class HGRU(MegatronModule):
    """The HGRU token mixer in megatron's attention slot: `[s, b, d] -> ([s, b, d], bias | None)`.

    `attention_mask`, which megatron forwards unchanged from `GPTModel.forward` to every layer, carries the
    document-reset mask here: bool `[b, s]`, True where a token starts a new document (the recurrent state is
    cleared before that token). `HGRNModel.forward` builds it from `doc_start`; None means one stream per
    sequence. The layer's lower bound γ_k comes from the model-level table attached with
    `attach_lower_bounds` (layer 0, and models without lower bounds, use γ = 0).
    """

    def __init__(
        self,
        config,
        submodules: HGRUSubmodules,
        layer_number: int,
        options: HGRUOptions = HGRUOptions(),
        pg_collection=None,
        **kwargs,  # newer megatron-core passes more (e.g. attn_mask_type, cp_comm_type, name)
    ):
        super().__init__(config=config)
        self.options = options
        self.layer_number = layer_number  # 1-based and global (megatron adds the pipeline offset)
        self.tp_group = pg_collection.tp if pg_collection is not None else (
            parallel_state.get_tensor_model_parallel_group())
        tp = dist.get_world_size(self.tp_group)
        # Context parallelism: this rank holds one contiguous piece of each sequence (`context_parallel.py`).
        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else (
            parallel_state.get_context_parallel_group(check_initialized=False))
        self.cp_group = cp_group if cp_group is not None and dist.get_world_size(cp_group) > 1 else None
        d = config.hidden_size
        self.width, self.features = options.width(d), options.features(d)
        if self.width % tp:
            raise ValueError(f"HGRU: {self.width} channels do not split over {tp} tensor-parallel ranks")
        self.local_width = self.width // tp
        bias = config.add_bias_linear if options.bias is None else options.bias

        def column(spec, out_features):
            return build_module(spec, d, out_features, config=config, init_method=config.init_method, bias=bias,
                                gather_output=False, skip_bias_add=False, tp_group=self.tp_group)

        self.linear_in = column(submodules.linear_in, self.features)
        self.linear_forget = column(submodules.linear_forget, self.width)
        self.linear_gate = column(submodules.linear_gate, self.features) if submodules.linear_gate else None
        self.norm = build_module(submodules.norm, config, self.features, kind=options.mixer_norm,
                                 eps=config.layernorm_epsilon, tp_group=self.tp_group)
        self.linear_out = build_module(
            submodules.linear_out, self.features, d, config=config, init_method=config.output_layer_init_method,
            bias=bias, input_is_parallel=True, skip_bias_add=True, tp_group=self.tp_group,
        )
        if options.variant == "complex":
            # RoPE-like phases θ_j = 10000^(−2j/d) over all d channels (authors' `Hgru1d`); this rank keeps
            # its channels, so θ is identical at every TP size.
            rank = dist.get_rank(self.tp_group)
            channels = torch.arange(rank * self.local_width, (rank + 1) * self.local_width, dtype=torch.float32)
            theta = 10000.0 ** (-2.0 * channels / self.width)
            self.theta = keep_fp32(torch.nn.Parameter(theta.to(config.params_dtype)))  # read in fp32 (fp32_params)
            set_tensor_model_parallel_attributes(self.theta, True, 0, 1)
        else:
            self.theta = None
        self._lower_bounds: tuple = ()  # (module,) once attached; a tuple so torch does not register it

    def attach_lower_bounds(self, lower_bounds: Callable[[int], torch.Tensor]) -> None:
        """Use `lower_bounds(layer_index) -> γ [local channels]`, a module the model owns (not a submodule)."""
        self._lower_bounds = (lower_bounds,)

    def lower_bound(self) -> torch.Tensor | None:
        """γ of this layer (this rank's channels), or None for γ = 0."""
        index = self.layer_number - 1
        if not self._lower_bounds or index == 0:
            # Layer 0's bound is identically 0 (cumsum minus its own first row): skipping it is exact, and it
            # avoids log(0) in the gate.
            return None
        return self._lower_bounds[0](index)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                inference_context=None, packed_seq_params=None, **kwargs):
        if inference_context is not None or kwargs.get("inference_params") is not None:
            raise NotImplementedError("HGRU: megatron inference contexts are not supported (export to HF instead)")
        if packed_seq_params is not None:
            raise NotImplementedError("HGRU: packed_seq_params is not supported; pass doc_start to the model")
        # The mixer works batch-first, the scan's layout. Without sequence parallelism one copy of the d-wide
        # input replaces transposing the scan's (up to 2·d-wide) input, log gate and output, and their
        # gradients. With it, `hidden_states` is this rank's share of the sequence [s / tp, b, d] and megatron's
        # linears gather and scatter along dim 0, so they work sequence-first and their outputs are turned here.
        # At b = 1 the two layouts are the same memory and nothing is copied.
        sequence_first = self.config.sequence_parallel
        x_in = hidden_states if sequence_first else hidden_states.transpose(0, 1).contiguous()

        def project(linear):  # [b, s, out / tp]
            out = linear(x_in)[0]
            return out.transpose(0, 1).contiguous() if sequence_first else out

        inputs = project(self.linear_in)  # [b, s, features/tp]
        forget = project(self.linear_forget)  # [b, s, channels/tp]
        b, s = inputs.shape[:2]
        reset = attention_mask
        if reset is not None and (reset.dtype != torch.bool or tuple(reset.shape) != (b, s)):
            raise ValueError(
                f"HGRU: the reset mask must be bool [batch, seq] = [{b}, {s}], got {reset.dtype} {tuple(reset.shape)}"
            )
        dtype = hidden_states.dtype
        log_lambda, one_minus_lambda = forget_gate(forget, self.lower_bound())
        x = gated_input(inputs, one_minus_lambda)  # silu(i)·(1 − λ), (re, im) of a channel share its gate
        if self.theta is not None:
            x = x.view(b, s, self.local_width, 2)
        # `forget_gate` guarantees log λ <= 0, so the scan's value check (a pass over the gate) is skipped; a
        # NaN reaches the loss, where the trainer's non-finite check skips the step. Under context parallelism
        # the scan starts from the state the earlier pieces hand over (without a CP group: `hgrn_scan`).
        h, _ = context_parallel_scan(
            x,
            log_lambda,
            theta=None if self.theta is None else fp32_view(self.theta),
            reset=reset,
            group=self.cp_group,
            backend=self.options.scan_backend,
        )
        h = h.reshape(b, s, -1)  # [b, s, features/tp], channel-major (re, im)

        gate = project(self.linear_gate) if self.linear_gate is not None else None
        # one fused step that saves h and the gate only
        y = self.norm(h, gate, activation=self.options.gate_activation, placement=self.options.gate_placement)
        if sequence_first:  # reduce-scattered over the sequence: this rank's share [s / tp, b, d]
            return self.linear_out(y.to(dtype).transpose(0, 1))
        output, bias = self.linear_out(y.to(dtype))  # [b, s, d]
        # megatron's layout [s, b, d] as a view; its bias-dropout-add writes the residual sum in its own layout.
        return output.transpose(0, 1), bias

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """θ is split along its channel axis; every submodule describes its own shards."""
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        sharded = make_sharded_tensors_for_checkpoint(
            own, prefix, {"theta": 0}, sharded_offsets, tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"]
        )
        for name, module in self.named_children():
            sharded.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata,
                                                      tp_group=self.tp_group))
        return sharded
