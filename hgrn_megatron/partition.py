"""The ways a parameter is split over tensor-parallel ranks (plain data, importable without torch).

The mixer descriptions (`hgrn_megatron.mixers`) name these for their own parameters; `hgrn_megatron.tp_rules`
holds the whole table and does the splitting and merging.

- column: split dim 0 (output features of a column-parallel linear); `stride=2` for the SwiGLU fc1, whose
  full weight is [gate; up] and whose rank r holds [gate_r; up_r] (megatron's `stride` argument);
- row: split dim 1 (input features of a row-parallel linear);
- vocab: split dim 0 of the padded vocabulary (embedding, LM head);
- channel: per-channel mixer vectors/tables split along their channel axis (θ, mixer norm, lower bounds);
- replicated: every rank holds the whole tensor (block norms, row-parallel biases).
"""
from __future__ import annotations

from dataclasses import dataclass


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
