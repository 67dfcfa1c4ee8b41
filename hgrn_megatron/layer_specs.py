"""Layer specs: megatron-core's local GPT layer, with a mixer in its `self_attention` slot.

Every mixer's layer starts from `get_gpt_layer_local_spec` (megatron-core modules only, no Transformer
Engine), so an HGRN and its Transformer baseline share the block norms, the SwiGLU MLP, the residual
bias-dropout-add and the initialisation; they differ only in the token mixer, which each mixer's description
(`hgrn_megatron.mixers`) builds. The baseline's core attention (softmax(QKᵀ)V, after megatron's QKV projection
and RoPE) is torch's `scaled_dot_product_attention` rather than megatron's local `DotProductAttention`, which
allocates from a CUDA-only buffer and forks the CUDA RNG tracker: the math is the same, it runs on CPU, and on
GPU it takes torch's fused kernels.
"""
from __future__ import annotations

import dataclasses
import math

import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec

from hgrn_megatron.config import ModelConfig
from hgrn_megatron.mixers import get_mixer

MEGATRON_NORM = {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}  # ModelConfig.norm -> megatron's normalization


class SDPACoreAttention(MegatronModule):
    """The `core_attention` of megatron's SelfAttention, computed by `F.scaled_dot_product_attention`.

    Takes megatron's layout and mask convention: query/key/value `[s, b, heads/tp, head_dim]`, a boolean
    `attention_mask` broadcastable to `[b, heads, s, s]` with True = masked, or None for plain causal.
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str = "self",
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 pg_collection=None, **kwargs):
        super().__init__(config=config)
        if config.num_query_groups not in (None, config.num_attention_heads):
            raise ValueError("SDPACoreAttention: grouped-query attention is not supported")
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        tp_group = pg_collection.tp if pg_collection is not None else (
            parallel_state.get_tensor_model_parallel_group())
        self.local_projection = head_dim * config.num_attention_heads // tp_group.size()

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("SDPACoreAttention: attention_bias / packed_seq_params are not supported")
        s, b = query.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads/tp, s, head_dim]
        causal = attention_mask is None and (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        context = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=None if attention_mask is None else ~attention_mask,  # SDPA: True = may attend
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal,
            scale=self.softmax_scale,
        )
        return context.permute(2, 0, 1, 3).reshape(s, b, self.local_projection)


def local_gpt_layer_spec(cfg: ModelConfig) -> ModuleSpec:
    """megatron-core's own local GPT layer: causal self-attention + SwiGLU MLP (the Transformer baseline)."""
    spec = get_gpt_layer_local_spec(normalization=MEGATRON_NORM[cfg.norm])
    attention = spec.submodules.self_attention
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, core_attention=SDPACoreAttention)
    )
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attention))


def layer_with_mixer(cfg: ModelConfig, mixer: ModuleSpec) -> ModuleSpec:
    """megatron's local GPT layer with `mixer` in place of its self-attention; everything else kept."""
    base = local_gpt_layer_spec(cfg)
    submodules = dataclasses.replace(
        base.submodules,
        self_attention=mixer,
        # The local spec renames the block norms' checkpoint keys to Transformer Engine's fused
        # `self_attention.linear_qkv.layer_norm_*`; another mixer has no linear_qkv, so keep the plain names.
        sharded_state_dict_keys_map={},
    )
    return dataclasses.replace(base, submodules=submodules)


def layer_spec(cfg: ModelConfig) -> ModuleSpec:
    """The transformer-layer spec for `cfg.mixer`, from its description."""
    return get_mixer(cfg.mixer).layer_spec(cfg)
