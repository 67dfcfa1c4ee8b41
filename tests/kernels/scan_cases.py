"""Shared helpers for the scan tests: case grid, random inputs, running a backend, comparing to float64."""
from __future__ import annotations

import dataclasses
import math

import torch

from hgrn_megatron.kernels import hgrn_scan_reference

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    B: int
    T: int
    D: int
    complex: bool = False
    initial: bool = False
    final: str | None = None  # None | "also" (loss on h and h_last) | "only" (loss on h_last alone)
    reset: str | None = None  # None | "random" | "edges" (t=0, consecutive runs, last token) | "all"
    dtype: torch.dtype = torch.float32
    chunk_size: int | None = None

    @property
    def id(self) -> str:
        parts = [f"B{self.B}-T{self.T}-D{self.D}", "complex" if self.complex else "real"]
        if self.initial:
            parts.append("h0")
        if self.final:
            parts.append(f"final_{self.final}")
        if self.reset:
            parts.append(f"reset_{self.reset}")
        parts.append(str(self.dtype).replace("torch.", ""))
        if self.chunk_size:
            parts.append(f"L{self.chunk_size}")
        return "-".join(parts)


def make_inputs(case: Case, seed: int = 0) -> dict:
    """Random, never-zero inputs; gates spread over (0, 1) with many close to 1 (g = logsigmoid(N(2, 1.5)))."""
    gen = torch.Generator().manual_seed(seed)
    B, T, D = case.B, case.T, case.D
    x_shape = (B, T, D, 2) if case.complex else (B, T, D)
    inputs = {
        "x": torch.randn(x_shape, generator=gen).to(case.dtype),
        "g": torch.nn.functional.logsigmoid(2 + 1.5 * torch.randn(B, T, D, generator=gen)).to(case.dtype),
    }
    if case.complex:
        inputs["theta"] = (torch.rand(D, generator=gen) * 2 - 1) * math.pi
    if case.initial:
        inputs["initial_state"] = torch.randn((B, D, 2) if case.complex else (B, D), generator=gen).to(case.dtype)
    if case.reset == "random":
        reset = torch.rand(B, T, generator=gen) < 0.08
        reset[0, 0] = True
        inputs["reset"] = reset
    elif case.reset == "edges":
        reset = torch.zeros(B, T, dtype=torch.bool)
        reset[:, 0] = True
        for start in (T // 3, T // 2):
            reset[-1, start:start + 3] = True  # consecutive resets
        reset[0, T - 1] = True
        inputs["reset"] = reset
    elif case.reset == "all":
        inputs["reset"] = torch.ones(B, T, dtype=torch.bool)
    return inputs


_GRAD_NAMES = {"x": "dx", "g": "dg", "theta": "dtheta", "initial_state": "dh0"}


def run(scan, case: Case, inputs: dict, *, float64: bool = False, seed: int = 1) -> dict:
    """Run `scan(x, g, **kw) -> (h, h_last)` and backprop a random linear loss; returns outputs and grads.

    With float64=True the inputs are widened first (reference run); otherwise they keep the case dtype.
    """
    leaves = {}
    for name, t in inputs.items():
        if name == "reset":
            continue
        t = t.detach().clone()
        if float64:
            t = t.double()
        leaves[name] = t.requires_grad_()
    kwargs = {k: v for k, v in leaves.items() if k not in ("x", "g")}
    if "reset" in inputs:
        kwargs["reset"] = inputs["reset"]
    h, h_last = scan(leaves["x"], leaves["g"], **kwargs)
    gen = torch.Generator().manual_seed(seed)
    w_h = torch.randn(h.shape, generator=gen, dtype=torch.float64)
    w_last = torch.randn(h_last.shape, generator=gen, dtype=torch.float64) if h_last is not None else None
    loss = 0
    if case.final != "only":
        loss = loss + (h.double() * w_h).sum()
    if case.final:
        loss = loss + (h_last.double() * w_last).sum()
    loss.backward()
    out = {"h": h.detach()}
    if case.final:
        out["h_last"] = h_last.detach()
    for name, t in leaves.items():
        out[_GRAD_NAMES[name]] = t.grad
    return out


def reference(case: Case, inputs: dict) -> dict:
    def scan(x, g, **kw):
        return hgrn_scan_reference(x, g, **kw)
    return run(scan, case, inputs, float64=True)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (exactly zero references must be matched exactly)."""
    diff = (out.double() - ref.double()).norm().item()
    scale = ref.double().norm().item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def assert_close_to_reference(out: dict, ref: dict, tol: float) -> None:
    assert out.keys() == ref.keys(), (sorted(out), sorted(ref))
    errors = {}
    for name in ref:
        assert out[name].shape == ref[name].shape, (name, out[name].shape, ref[name].shape)
        assert torch.isfinite(out[name]).all(), f"{name} has non-finite values"
        errors[name] = relative_error(out[name], ref[name])
    bad = {k: f"{v:.2e}" for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative error above {tol:.0e}: {bad} (all: { {k: f'{v:.1e}' for k, v in errors.items()} })"
