"""The batch contract: what a micro-batch holds, and how it becomes the model's inputs and labels.

A micro-batch is `{"tokens": Long[mb, S+1], "doc_start": Bool[mb, S+1]}` (validation batches add
`"source_ids": Long[mb, S+1]`). Sample m of a lane covers tokens [m*S, m*S + S] of the lane's stream, so the
model reads the first S tokens and predicts the last S: input position i is labelled with token i + 1.
`model_inputs` is the one place that shift is written.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import torch


class ModelInputs(NamedTuple):
    """One micro-batch as the model takes it: `model(input_ids, labels=labels, doc_start=doc_start)`."""

    input_ids: torch.Tensor  # [mb, S]: tokens[:, :-1]
    labels: torch.Tensor  # [mb, S]: tokens[:, 1:], the next token of each input
    doc_start: torch.Tensor | None  # [mb, S]: which inputs begin a document (None when the batch has no mask)


def model_inputs(batch: Mapping | torch.Tensor, device=None) -> ModelInputs:
    """Inputs, labels and the inputs' document starts of a micro-batch (or of its `tokens` alone).

    `device`: move there first (non-blocking), so the shift is taken of the device copy.
    """
    tokens, doc_start = (batch, None) if not isinstance(batch, Mapping) else (batch["tokens"], batch.get("doc_start"))
    if device is not None:
        tokens = tokens.to(device, non_blocking=True)
        doc_start = doc_start.to(device, non_blocking=True) if doc_start is not None else None
    return ModelInputs(tokens[:, :-1], tokens[:, 1:], doc_start[:, :-1] if doc_start is not None else None)


def label_sources(batch: Mapping) -> torch.Tensor:
    """Source index of each label of a validation batch: `source_ids` aligned with `model_inputs(...).labels`."""
    return batch["source_ids"][:, 1:]


def collate(samples: Sequence[tuple[np.ndarray, ...]], keys: Sequence[str] = ("tokens", "doc_start")) -> dict:
    """Stack per-sample arrays (in `keys` order) into a micro-batch of tensors; tokens become Long."""
    import torch

    out = {key: torch.from_numpy(np.stack([s[i] for s in samples])) for i, key in enumerate(keys)}
    out["tokens"] = out["tokens"].long()
    return out
