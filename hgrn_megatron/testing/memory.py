"""Activation memory as autograd sees it: the bytes saved for the backward pass (tests and benchmarks)."""
from __future__ import annotations

import torch


def saved_tensor_bytes(run, params):
    """Call `run()` and return `(its result, bytes autograd saved for the backward pass)`, counting each storage
    once and leaving out the storages of `params` (the weights)."""
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = run()
    weights = {p.untyped_storage().data_ptr() for p in params}
    return result, sum(n for ptr, n in saved.items() if ptr not in weights)
