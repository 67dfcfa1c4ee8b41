"""The HGRN language model: megatron-core's GPTModel with HGRU mixers and a model-level lower-bound table.

megatron-core does what it already does well: the vocab-parallel embedding, the layer stack (norms, SwiGLU
MLP, residuals), the vocab-parallel LM head and cross entropy, initialisation and sharded state dicts.
`HGRNModel` adds the one thing a stack of independent layers cannot hold: the lower bounds γ of HGRN §3.2,
one `[num_layers, channels]` table whose softmax over layers is shared by every layer. The mixer is any
registered in `hgrn_megatron.mixers`; its description gives the layer spec, the position embedding, whether
the table exists and how document starts reach it. With `mixer: attention` the same class is the Transformer
baseline (megatron's local attention, RoPE).

    model = build_model(cfg, padded_vocab_size)          # needs megatron parallel_state initialised
    loss = model(tokens[:, :-1], labels=tokens[:, 1:], doc_start=doc_start[:, :-1])   # [b, s] fp32
    logits = model(tokens)                                # [b, s, vocab / tp]
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

from hgrn_megatron.chunked_loss import chunked_cross_entropy
from hgrn_megatron.config import ModelConfig
from hgrn_megatron.fp32_params import fp32_view, keep_fp32
from hgrn_megatron.layer_specs import MEGATRON_NORM, layer_spec
from hgrn_megatron.mixers import get_mixer
from hgrn_megatron.sequence_parallel import install_cpu_support as install_sequence_parallel_cpu_support
from hgrn_megatron.sequence_parallel import sequence_parallel_block_spec, sum_sequence_parallel_gradients


def transformer_config_from(
    cfg: ModelConfig,
    *,
    tp_size: int,
    params_dtype: torch.dtype = torch.float32,
    perform_initialization: bool = True,
    sequence_parallel: bool = False,
) -> TransformerConfig:
    """megatron-core's TransformerConfig for `cfg` at `tp_size` tensor-parallel ranks.

    Weights are always initialised on the CPU from the full (master) matrix and then split, so the initial
    model is the same at every TP size and needs no CUDA RNG tracker. Fusions and gradient-accumulation fusion
    are off: they need Apex/TE/CUDA kernels this stack does not require. `sequence_parallel` turns on
    megatron's sequence parallelism (`sequence_parallel.py`); at TP = 1 it is a no-op, as in Megatron-LM.
    """
    cfg.validate_parallel(tp_size)
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        tensor_model_parallel_size=tp_size,
        normalization=MEGATRON_NORM[cfg.norm],
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,  # SwiGLU (Shazeer 2020), as in the HGRN LMs
        activation_func=F.silu,
        add_bias_linear=cfg.add_bias_linear,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=True,
        perform_initialization=perform_initialization,
        sequence_parallel=sequence_parallel and tp_size > 1,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        recompute_granularity=cfg.recompute_granularity,
        recompute_method=cfg.recompute_method if cfg.recompute_granularity else None,
        recompute_num_layers=cfg.recompute_num_layers if cfg.recompute_granularity else None,
    )


def lower_bounds_from_table(table: torch.Tensor) -> torch.Tensor:
    """γ `[num_layers, channels]` = cumsum(softmax(table)) − its first row, over layers (dim 0), in fp32."""
    weights = table.float().softmax(dim=0)
    return weights.cumsum(dim=0) - weights[0]


class LayerLowerBounds(MegatronModule):
    """The forget-gate lower bounds of every layer (HGRN §3.2), from one learnable table.

    γ = cumsum_over_layers(softmax_over_layers(table)) − (its first row); layer k (0-based) uses row k, so
    γ_0 = 0, γ rises with depth and stays below 1 (γ_{L−1} = 1 − softmax_0). The table starts at zero: a
    uniform softmax, γ_k = k / L. This rank holds the columns of its own channels (split along dim 1).
    Called by the mixers (`bounds(k)`), so ZeRO-3 gathers the table like any module's weight.
    """

    def __init__(self, config: TransformerConfig, num_layers: int, channels: int, tp_group=None):
        super().__init__(config=config)
        self.tp_group = tp_group if tp_group is not None else parallel_state.get_tensor_model_parallel_group()
        tp = torch.distributed.get_world_size(self.tp_group)
        table = torch.nn.Parameter(torch.zeros(num_layers, channels // tp, dtype=config.params_dtype))
        self.table = keep_fp32(table)  # read in fp32 even under bf16 training (`fp32_params`)
        set_tensor_model_parallel_attributes(self.table, True, 1, 1)

    def forward(self, layer_index: int | None = None) -> torch.Tensor:
        """γ for one layer `[channels / tp]`, or for all `[num_layers, channels / tp]`, in fp32."""
        gamma = lower_bounds_from_table(fp32_view(self.table))
        return gamma if layer_index is None else gamma[layer_index]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """The table is split along its channel axis (dim 1)."""
        state = {}
        self._save_to_state_dict(state, "", keep_vars=True)
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {"table": 1}, sharded_offsets, tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"]
        )


class HostRotaryEmbedding(RotaryEmbedding):
    """megatron's RoPE table, usable on a machine without CUDA.

    `RotaryEmbedding.get_emb` moves its frequencies to `torch.cuda.current_device()` on first use; without
    CUDA this computes the same table on the CPU.
    """

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        if torch.cuda.is_available():
            return super().get_emb(max_seq_len, offset)
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)  # [s, dim / 2]
        if self.rotary_interleaved:
            emb = torch.stack((freqs, freqs), dim=-1).view(freqs.shape[0], -1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, None, None, :]  # [s, 1, 1, dim]


class HGRNModel(GPTModel):
    """GPTModel with HGRU mixers (or another registered mixer), the lower-bound table and a `doc_start` input.

    `loss_chunk_tokens` (`ModelConfig.loss_chunk_tokens`; None: megatron's full logits): with labels, and more
    tokens than that in the micro-batch, compute the LM head and the loss that many tokens at a time,
    recomputing the logits in the backward pass (`chunked_loss.py`): the same loss and gradients without the
    fp32 logits in memory.
    """

    loss_chunk_tokens: int | None = None

    def __init__(self, config: TransformerConfig, model_cfg: ModelConfig, vocab_size: int, **kwargs):
        mixer = get_mixer(model_cfg.mixer)
        spec = layer_spec(model_cfg)
        if config.sequence_parallel:
            install_sequence_parallel_cpu_support()  # a no-op with CUDA
            spec = sequence_parallel_block_spec(spec, config.num_layers)
        super().__init__(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=vocab_size,
            max_sequence_length=model_cfg.seq_length,
            share_embeddings_and_output_weights=model_cfg.share_embeddings_and_output_weights,
            position_embedding_type=mixer.position_embedding,
            rotary_base=model_cfg.rotary_base,
            **kwargs,
        )
        self.model_cfg, self.mixer_spec = model_cfg, mixer
        self.loss_chunk_tokens = getattr(model_cfg, "loss_chunk_tokens", None)
        if not mixer.context_parallel and self.cp_group.size() > 1:
            raise ValueError(f"HGRNModel: the {mixer.title} mixer does not support context parallelism (it would "
                             "see only its own rank's piece of the sequence)")
        if hasattr(self, "rotary_pos_emb") and not torch.cuda.is_available():
            self.rotary_pos_emb.__class__ = HostRotaryEmbedding  # same state, CPU-safe table construction
        channels = mixer.lower_bound_channels(model_cfg)
        if channels:
            self.lower_bounds = LayerLowerBounds(config, model_cfg.num_layers, channels, self.tp_group)
            for layer in self.decoder.layers:
                layer.self_attention.attach_lower_bounds(self.lower_bounds)
        else:
            self.lower_bounds = None
        if config.sequence_parallel:  # the block norms' (and row-parallel biases') gradients: summed over TP
            sum_sequence_parallel_gradients(self, self.tp_group)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, decoder_input=None,
                labels: torch.Tensor | None = None, *, doc_start: torch.Tensor | None = None, **kwargs):
        """Per-token loss `[b, s]` (fp32) when `labels` are given, else logits `[b, s, vocab / tp]`.

        `doc_start` bool `[b, s]`: True where token t starts a new document; used only when the config has
        `reset_at_document_boundary`. The document structure reaches the mixers through megatron's
        `attention_mask` argument, which GPTModel hands unchanged to every layer's mixer, also through
        megatron's activation-recompute path, so it is a real argument and never hidden module state. Its form
        is the mixer's `document_mask`:
        - "reset" (HGRU): the reset mask itself, bool `[b, s]` (None: one stream per sequence);
        - "attention": None (causal), or when resetting megatron's boolean mask `[b, 1, s, s]` (True = masked),
          causal and block-diagonal over documents.
        """
        if self.mixer_spec.document_mask == "reset" and attention_mask is not None:
            raise ValueError(f"HGRNModel: the {self.model_cfg.mixer!r} mixer has no attention mask; "
                             "pass doc_start for document resets")
        tp = self.tp_group.size()
        if self.config.sequence_parallel and input_ids.shape[1] % tp:
            raise ValueError(f"HGRNModel: with sequence parallelism the sequence length ({input_ids.shape[1]}) must "
                             f"be divisible by the tensor-parallel size ({tp})")
        mask = self.mixer_mask(input_ids, doc_start) if attention_mask is None else attention_mask
        return super().forward(input_ids, position_ids, mask, decoder_input=decoder_input, labels=labels, **kwargs)

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        """megatron's output layer and loss, or with `loss_chunk_tokens` set (training with labels) the chunked
        loss, which never holds the whole sequence's logits."""
        plain = (labels is None or not self.loss_chunk_tokens or labels.numel() <= self.loss_chunk_tokens
                 or not self.post_process or self.mtp_process
                 or kwargs.get("inference_context") is not None or self.output_layer.bias is not None)
        if plain:
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        weight = (self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights
                  else self.output_layer.weight)
        return chunked_cross_entropy(hidden_states, weight, labels, chunk_tokens=self.loss_chunk_tokens,
                                     sequence_parallel=self.output_layer.sequence_parallel, tp_group=self.tp_group)

    def mixer_mask(self, input_ids: torch.Tensor, doc_start: torch.Tensor | None) -> torch.Tensor | None:
        """What each layer's mixer receives as `attention_mask` (see `forward`)."""
        b, s = input_ids.shape
        resetting = self.model_cfg.reset_at_document_boundary and doc_start is not None
        if resetting and (doc_start.dtype != torch.bool or tuple(doc_start.shape) != (b, s)):
            raise ValueError(
                f"HGRNModel: doc_start must be bool [batch, seq] = [{b}, {s}] like input_ids, "
                f"got {doc_start.dtype} {tuple(doc_start.shape)}"
            )
        if not resetting:
            return None  # reset: one stream per sequence; attention: plain causal
        if self.mixer_spec.document_mask == "reset":
            return doc_start
        document = doc_start.long().cumsum(dim=1)  # document index of every token
        future = torch.ones(s, s, dtype=torch.bool, device=input_ids.device).triu(diagonal=1)
        return (future[None] | (document[:, :, None] != document[:, None, :]))[:, None]  # [b, 1, s, s]


def build_model(
    cfg: ModelConfig, padded_vocab_size: int, *, params_dtype: torch.dtype = torch.float32, meta: bool = False,
    initialize: bool = True, sequence_parallel: bool = False,
) -> HGRNModel:
    """Build this rank's shard of the model (megatron `parallel_state` must be initialised).

    Weights come from the global torch RNG (seed it first): the same seed gives the same full model at any
    TP size. `meta=True` builds on the meta device without initialising (for counting parameters);
    `initialize=False` leaves megatron's random initialisation of the linear and embedding weights out (their
    values are then undefined), for a model whose every weight a checkpoint load overwrites: megatron builds
    each full weight on the CPU before splitting it, which costs a 1B model ~18 s per rank.
    `sequence_parallel`: megatron's sequence parallelism over the TP group (a no-op at TP = 1); the model then
    takes and returns the same full-sequence tensors, each TP rank holding a share of the activations inside.
    """
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if padded_vocab_size % tp_size:
        raise ValueError(
            f"build_model: padded_vocab_size {padded_vocab_size} is not divisible by the tensor-parallel size "
            f"{tp_size} (pad it with hgrn_megatron.tokenizer.padded_vocab_size)"
        )
    config = transformer_config_from(cfg, tp_size=tp_size, params_dtype=params_dtype,
                                     perform_initialization=initialize and not meta,
                                     sequence_parallel=sequence_parallel)
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = HGRNModel(config, cfg, padded_vocab_size)
    if not initialize:
        _mark_tensor_parallel(model)
    return model


def _mark_tensor_parallel(model: HGRNModel) -> None:
    """Set megatron's TP attributes (`tensor_model_parallel`, `partition_dim`, `partition_stride`) of every split
    parameter from `tp_rules`: megatron sets them inside its weight initialisation, so a model built without it
    would otherwise count split weights as replicated (wrong gradient norms and clipping at TP > 1)."""
    from hgrn_megatron.tp_rules import rule_for

    for name, param in model.named_parameters():
        rule = rule_for(name)
        if rule.kind != "replicated" and not getattr(param, "tensor_model_parallel", False):
            set_tensor_model_parallel_attributes(param, True, rule.dim, rule.stride)


@contextlib.contextmanager
def single_process_model_parallel():
    """A one-process gloo group with megatron's parallel state at TP = 1, for tools and benchmarks that build a
    model outside a launcher (`hgrn-model info --verify`, `benchmarks/model_mixer.py`). Torn down on exit."""
    import os
    import tempfile

    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
            yield
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """True for parameters trained without weight decay: norms, biases, θ and the lower-bound table.

    Every 1-D parameter is one of the first three (weights of linears and embeddings are 2-D); the table is
    2-D but is a set of gate offsets, not a weight matrix.
    """
    return param.ndim < 2 or name.endswith("lower_bounds.table")
