"""Host copies of the state a background save writes, in buffers kept from one save to the next.

The part of a background save that the training step waits for is the copy of every tensor it writes (the
next optimizer step changes them in place). A fresh copy (`tensor.clone()`) of a few hundred MB costs several
times the copy itself on the CPU: the kernel supplies and zeroes every new page on first touch (measured here:
0.17-0.20 s for a fresh 400 MB clone, 0.03 s for a copy into memory touched before). So each file's tensors are
copied into buffers kept from the previous save of the same file, allocated once, in pinned host memory when
the tensors live on a GPU (the device-to-host copy then runs at the bus's full rate). A buffer is reused only
after the previous save's writer finished with it (`HashingCheckpointEngine.begin` waits for that first).

The copy gives a writer what DeepSpeed's `clone_tensors_for_torch_save` gives it, with the containers' types
kept: lists, tuples and dicts holding tensors rebuilt, every tensor a compact host copy of its own (a view of a
flat buffer is saved as its elements, not the whole buffer), anything else passed as it is.
"""
from __future__ import annotations

from typing import Any

import torch


class HostSnapshot:
    def __init__(self) -> None:
        self._buffers: dict[str, list[torch.Tensor]] = {}

    def take(self, state: Any, key: str) -> Any:
        """A copy of `state` in host memory, in the buffers of the previous snapshot with this `key` where the
        tensors' shapes and dtypes still match (new buffers elsewhere). Returns once the copy is complete."""
        previous, used = iter(self._buffers.get(key, ())), []
        copied = _copy(state, previous, used)
        self._buffers[key] = used
        if any(t.is_pinned() for t in used) and torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
        return copied

    def nbytes(self) -> int:
        """Host memory held in buffers."""
        return sum(t.numel() * t.element_size() for bufs in self._buffers.values() for t in bufs)


def _copy(item: Any, previous, used: list[torch.Tensor]) -> Any:
    if torch.is_tensor(item):
        source = item.detach()
        buffer = next(previous, None)
        if buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype \
                or buffer.is_pinned() != source.is_cuda:
            buffer = torch.empty(source.shape, dtype=source.dtype, device="cpu", pin_memory=source.is_cuda)
        buffer.copy_(source, non_blocking=source.is_cuda)
        used.append(buffer)
        return buffer
    if isinstance(item, list):
        return [_copy(v, previous, used) for v in item]
    if isinstance(item, tuple):
        copied = [_copy(v, previous, used) for v in item]
        if all(c is v for c, v in zip(copied, item)):
            return item  # nothing to copy inside (a torch.Size, a tuple of numbers): kept, its type included
        return type(item)(*copied) if hasattr(item, "_fields") else type(item)(copied)
    if isinstance(item, dict):
        return type(item)({k: _copy(v, previous, used) for k, v in item.items()})
    return item
