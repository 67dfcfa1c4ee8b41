"""How every parameter of the model is split over tensor-parallel ranks: one declarative table.

Keys are megatron state-dict names (as `HGRNModel.state_dict()` writes them, and as DeepSpeed stores them
under `module` in `mp_rank_XX_model_states.pt`). Used to build TP = N shards from a TP = 1 model in the tests,
to merge TP shards into one model for the Hugging Face exporter, and to merge a checkpoint for a TP change on
resume. The kinds of split are those of `hgrn_megatron.partition`; each mixer's own parameters come from its
description (`MixerSpec.tp_rules`, relative to the layer's `self_attention` slot).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from hgrn_megatron.mixers import MIXERS
from hgrn_megatron.partition import (  # noqa: F401  the kinds are part of this module's interface
    CHANNEL,
    CHANNEL_OF_TABLE,
    COLUMN,
    COLUMN_GLU,
    REPLICATED,
    ROW,
    VOCAB,
    PartitionRule,
)

_LAYER = r"decoder\.layers\.\d+\."
MIXER_SLOT = _LAYER + r"self_attention\."  # what every mixer's tp_rules patterns are relative to
MODEL_RULES: list[tuple[str, PartitionRule]] = [
    (r"embedding\.word_embeddings\.weight", VOCAB),
    (r"output_layer\.weight", VOCAB),
    (r"lower_bounds\.table", CHANNEL_OF_TABLE),  # [num_layers, channels]
]
BLOCK_RULES: list[tuple[str, PartitionRule]] = [
    # SwiGLU MLP
    (_LAYER + r"mlp\.linear_fc1\.(weight|bias)", COLUMN_GLU),
    (_LAYER + r"mlp\.linear_fc2\.weight", ROW),
    (_LAYER + r"mlp\.linear_fc2\.bias", REPLICATED),
    # block norms
    (_LAYER + r"(input_layernorm|pre_mlp_layernorm)\.(weight|bias)", REPLICATED),
    (r"decoder\.final_layernorm\.(weight|bias)", REPLICATED),
]
EXTRA_STATE_SUFFIX = "_extra_state"  # megatron/TE bookkeeping entries (None or bytes); passed through


def partition_table() -> list[tuple[str, PartitionRule]]:
    """Every rule: the model's, each registered mixer's (under the mixer slot), the MLP's and the norms'.

    Read from the registry at each call, so a mixer registered later is covered.
    """
    mixer_rules = [(MIXER_SLOT + pattern, rule) for spec in MIXERS.values() for pattern, rule in spec.tp_rules]
    return MODEL_RULES + mixer_rules + BLOCK_RULES


def rule_for(name: str) -> PartitionRule:
    """The partition rule of state-dict entry `name`; KeyError if the table does not know it.

    Two mixers may name a parameter alike (`linear_out.weight`) only if they split it alike: a name whose
    matching rules disagree is an error, never a silent first match.
    """
    rules = {rule for pattern, rule in partition_table() if re.fullmatch(pattern, name)}  # re caches patterns
    if len(rules) > 1:
        raise ValueError(f"tp_rules: parameter '{name}' matches rules that disagree: {sorted(map(repr, rules))}")
    if not rules:
        raise KeyError(f"tp_rules: no partition rule for parameter '{name}' (a mixer's own parameters are in "
                       "its MixerSpec.tp_rules; the rest in hgrn_megatron.tp_rules)")
    return rules.pop()


def split_tensor(tensor: torch.Tensor, rule: PartitionRule, tp_size: int, tp_rank: int, name: str = "") -> torch.Tensor:
    """Rank `tp_rank`'s shard of the full `tensor`."""
    if rule.kind == "replicated" or tp_size == 1:
        return tensor.clone()
    size = tensor.shape[rule.dim]
    if size % (tp_size * rule.stride):
        raise ValueError(
            f"tp_rules: '{name}' has {size} entries along dim {rule.dim}, not divisible by "
            f"tp_size {tp_size} x stride {rule.stride}"
        )
    blocks = torch.chunk(tensor, tp_size * rule.stride, dim=rule.dim)
    return torch.cat(blocks[tp_rank::tp_size], dim=rule.dim).clone()


def merge_tensors(shards: Sequence[torch.Tensor], rule: PartitionRule, name: str = "",
                  replicated_atol: float = 0.0) -> torch.Tensor:
    """The full tensor from every rank's shard (rank order); replicated shards must agree."""
    if rule.kind == "replicated" or len(shards) == 1:
        for rank, shard in enumerate(shards[1:], start=1):
            if shard.shape != shards[0].shape or not torch.allclose(shard, shards[0], rtol=0.0, atol=replicated_atol):
                raise ValueError(f"tp_rules: replicated '{name}' differs between TP rank 0 and rank {rank}")
        return shards[0].clone()
    tp_size = len(shards)
    per_rank = [torch.chunk(shard, rule.stride, dim=rule.dim) for shard in shards]
    # Full layout: stride groups, each holding every rank's block in rank order.
    return torch.cat([per_rank[r][s] for s in range(rule.stride) for r in range(tp_size)], dim=rule.dim)


def split_state_dict(full_sd: Mapping[str, object], tp_size: int, tp_rank: int) -> dict[str, object]:
    """TP rank `tp_rank`'s state dict from a full (TP = 1) one."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rules: tp_rank {tp_rank} is outside [0, {tp_size})")
    out: dict[str, object] = {}
    for name, value in full_sd.items():
        if name.endswith(EXTRA_STATE_SUFFIX):
            out[name] = value
        else:
            out[name] = split_tensor(value, rule_for(name), tp_size, tp_rank, name)
    return out


def merge_state_dicts(rank_sds: Sequence[Mapping[str, object]], *, replicated_atol: float = 0.0) -> dict[str, object]:
    """The full (TP = 1) state dict from every TP rank's state dict, in rank order.

    Replicated entries must agree between ranks to `replicated_atol` (exactly, by default).
    """
    if not rank_sds:
        raise ValueError("tp_rules: merge_state_dicts needs at least one state dict")
    names = list(rank_sds[0])
    for rank, sd in enumerate(rank_sds[1:], start=1):
        if set(sd) != set(names):
            missing, extra = set(names) - set(sd), set(sd) - set(names)
            raise ValueError(
                f"tp_rules: TP rank {rank}'s state dict has different keys from rank 0's "
                f"(missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]})"
            )
    out: dict[str, object] = {}
    for name in names:
        if name.endswith(EXTRA_STATE_SUFFIX):
            out[name] = rank_sds[0][name]
        else:
            out[name] = merge_tensors([sd[name] for sd in rank_sds], rule_for(name), name, replicated_atol)
    return out
