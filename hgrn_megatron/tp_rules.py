"""How every parameter of the model is split over tensor-parallel ranks: one declarative table.

Keys are megatron state-dict names (as `HGRNModel.state_dict()` writes them, and as DeepSpeed stores them
under `module` in `mp_rank_XX_model_states.pt`). Used to build TP = N shards from a TP = 1 model in the tests,
and to merge TP shards into one model for the Hugging Face exporter.

Rules:
- column: split dim 0 (output features of a column-parallel linear); `stride=2` for the SwiGLU fc1, whose
  full weight is [gate; up] and whose rank r holds [gate_r; up_r] (megatron's `stride` argument);
- row: split dim 1 (input features of a row-parallel linear);
- vocab: split dim 0 of the padded vocabulary (embedding, LM head);
- channel: per-channel HGRU vectors/tables split along their channel axis (θ, mixer norm, lower bounds);
- replicated: every rank holds the whole tensor (block norms, row-parallel biases).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PartitionRule:
    kind: str  # column | row | vocab | channel | replicated
    dim: int | None = None  # the split axis (None when replicated)
    stride: int = 1  # contiguous blocks per rank: rank r holds blocks r, r + tp, r + 2·tp, ...


COLUMN = PartitionRule("column", 0)
COLUMN_GLU = PartitionRule("column", 0, stride=2)
ROW = PartitionRule("row", 1)
VOCAB = PartitionRule("vocab", 0)
CHANNEL = PartitionRule("channel", 0)
CHANNEL_OF_TABLE = PartitionRule("channel", 1)
REPLICATED = PartitionRule("replicated")

_LAYER = r"decoder\.layers\.\d+\."
TP_RULES: list[tuple[str, PartitionRule]] = [
    (r"embedding\.word_embeddings\.weight", VOCAB),
    (r"output_layer\.weight", VOCAB),
    (r"lower_bounds\.table", CHANNEL_OF_TABLE),  # [num_layers, channels]
    # HGRU mixer
    (_LAYER + r"self_attention\.linear_(in|forget|gate)\.(weight|bias)", COLUMN),
    (_LAYER + r"self_attention\.(theta|norm\.weight|norm\.bias)", CHANNEL),
    (_LAYER + r"self_attention\.linear_out\.weight", ROW),
    (_LAYER + r"self_attention\.linear_out\.bias", REPLICATED),
    # attention baseline (megatron's QKV weight is grouped per head, so a contiguous split gives whole heads)
    (_LAYER + r"self_attention\.linear_qkv\.(weight|bias)", COLUMN),
    (_LAYER + r"self_attention\.linear_proj\.weight", ROW),
    (_LAYER + r"self_attention\.linear_proj\.bias", REPLICATED),
    # SwiGLU MLP
    (_LAYER + r"mlp\.linear_fc1\.(weight|bias)", COLUMN_GLU),
    (_LAYER + r"mlp\.linear_fc2\.weight", ROW),
    (_LAYER + r"mlp\.linear_fc2\.bias", REPLICATED),
    # block norms
    (_LAYER + r"(input_layernorm|pre_mlp_layernorm)\.(weight|bias)", REPLICATED),
    (r"decoder\.final_layernorm\.(weight|bias)", REPLICATED),
]
_COMPILED = [(re.compile(pattern), rule) for pattern, rule in TP_RULES]
EXTRA_STATE_SUFFIX = "_extra_state"  # megatron/TE bookkeeping entries (None or bytes); passed through


def rule_for(name: str) -> PartitionRule:
    """The partition rule of state-dict entry `name`; KeyError if the table does not know it."""
    for pattern, rule in _COMPILED:
        if pattern.fullmatch(name):
            return rule
    raise KeyError(f"tp_rules: no partition rule for parameter '{name}' (add it to TP_RULES)")


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
