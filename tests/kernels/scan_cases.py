"""Shared helpers for the scan tests: case grid, random inputs, running a backend, comparing to float64."""
from __future__ import annotations

import dataclasses
import math

import torch

from hgrn_megatron.kernels import hgrn_scan, hgrn_scan_reference

# Relative error allowed against the float64 loop. Under Triton's interpreter an fp32 -> bf16 cast truncates
# (every value rounds down in magnitude; a GPU rounds to nearest), doubling the bf16 error (3e-3 against 1.6e-3
# on the torch path): the bf16 bound is met either way, so it says nothing about the GPU's rounding.
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
    dtype: torch.dtype = torch.float32  # of x (and of g and initial_state unless given below)
    chunk_size: int | None = None
    g_dtype: torch.dtype | None = None  # training passes bf16 x with fp32 gates
    initial_dtype: torch.dtype | None = None

    @property
    def gate_dtype(self) -> torch.dtype:
        return self.g_dtype or self.dtype

    @property
    def last_dtype(self) -> torch.dtype:
        """h_last's dtype: the accumulation dtype, fp32 (fp64 for fp64 x)."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

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
        if self.g_dtype:
            parts.append("g_" + str(self.g_dtype).replace("torch.", ""))
        if self.initial_dtype:
            parts.append("h0_" + str(self.initial_dtype).replace("torch.", ""))
        if self.chunk_size:
            parts.append(f"L{self.chunk_size}")
        return "-".join(parts)


# The grid for the CPU backends (torch and cpu): every option, ragged T and D, B = 1, T = 1, narrow dtypes.
CPU_CASES = [
    Case(2, 63, 17),
    Case(2, 63, 17, complex=True),
    Case(2, 64, 16, initial=True, final="also", chunk_size=8),
    Case(2, 100, 9, complex=True, initial=True, final="also", chunk_size=8),
    Case(3, 257, 5, initial=True, final="also", reset="random"),
    Case(3, 257, 5, complex=True, initial=True, final="also", reset="random"),
    Case(2, 50, 7, initial=True, reset="edges", chunk_size=4),
    Case(2, 50, 7, complex=True, initial=True, final="also", reset="edges", chunk_size=4),
    Case(2, 31, 3, complex=True, initial=True, final="only", chunk_size=4),
    Case(2, 12, 4, initial=True, final="also", reset="all", chunk_size=4),
    Case(1, 1, 5, complex=True, initial=True, final="also"),
    Case(1, 1, 1, initial=True, final="also"),
    Case(1, 7, 33),
    Case(2, 130, 24, initial=True, final="also", reset="random", dtype=torch.bfloat16),
    Case(2, 130, 24, complex=True, initial=True, final="also", reset="edges", dtype=torch.bfloat16),
    Case(2, 70, 16, complex=True, initial=True, final="also", dtype=torch.float16, chunk_size=8),
    # the HGRU's mix in bf16 training: bf16 x, fp32 gates and theta; a state of yet another dtype
    Case(2, 130, 24, complex=True, initial=True, final="also", reset="random", dtype=torch.bfloat16,
         g_dtype=torch.float32, initial_dtype=torch.float16),
    Case(2, 45, 6, complex=True, initial=True, final="also", reset="edges", dtype=torch.float64, chunk_size=8),
    Case(2, 45, 6, initial=True, final="also", reset="random", dtype=torch.float64),
]



def make_inputs(case: Case, seed: int = 0) -> dict:
    """Random, never-zero inputs; gates spread over (0, 1) with many close to 1 (g = logsigmoid(N(2, 1.5)))."""
    gen = torch.Generator().manual_seed(seed)
    B, T, D = case.B, case.T, case.D
    x_shape = (B, T, D, 2) if case.complex else (B, T, D)
    inputs = {
        "x": torch.randn(x_shape, generator=gen).to(case.dtype),
        "g": torch.nn.functional.logsigmoid(2 + 1.5 * torch.randn(B, T, D, generator=gen)).to(case.gate_dtype),
    }
    if case.complex:
        theta = (torch.rand(D, generator=gen) * 2 - 1) * math.pi  # fp32, as the model keeps it (fp64 for fp64)
        inputs["theta"] = theta.double() if case.dtype == torch.float64 else theta
    if case.initial:
        inputs["initial_state"] = torch.randn((B, D, 2) if case.complex else (B, D), generator=gen).to(
            case.initial_dtype or case.dtype)
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


def gradcheck_scan(scan, complex_mode: bool) -> bool:
    """`torch.autograd.gradcheck` in float64 of `scan(x, g, theta=, initial_state=, reset=, output_final_state=True)`
    at B=2, T=11, D=3 with an initial state, a reset at t = 0 and two consecutive resets."""
    gen = torch.Generator().manual_seed(0)
    B, T, D = 2, 11, 3
    x = torch.randn((B, T, D, 2) if complex_mode else (B, T, D), generator=gen, dtype=torch.float64)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, D, generator=gen, dtype=torch.float64))
    h0 = torch.randn((B, D, 2) if complex_mode else (B, D), generator=gen, dtype=torch.float64)
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[0, 0] = reset[1, 4] = reset[1, 5] = True
    inputs = [x, g, h0] + ([torch.randn(D, generator=gen, dtype=torch.float64)] if complex_mode else [])
    inputs = [t.requires_grad_() for t in inputs]

    def fn(x, g, h0, theta=None):
        return scan(x, g, theta=theta, initial_state=h0, reset=reset, output_final_state=True)

    return torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def check_long_sequence(backend: str, complex_mode: bool) -> None:
    """T = 65,536 with decays at both extremes: finite, equal to the float64 loop at sampled positions, and
    fp32 gradients equal to the same backend's float64 gradients (float64 itself is covered by gradcheck)."""
    gen = torch.Generator().manual_seed(3)
    B, T, D = 1, 65536, 6
    x = torch.randn((B, T, D, 2) if complex_mode else (B, T, D), generator=gen)
    # Channel pairs: decay ~ 1 (g = -1e-6 .. -1e-4), decay ~ 0 (g down to -80), and a mixture in time.
    near_one = -10 ** (-6 + 2 * torch.rand(B, T, 2, generator=gen))
    near_zero = -80 * torch.rand(B, T, 2, generator=gen)
    mixed = torch.where(torch.rand(B, T, 2, generator=gen) < 0.5, near_one, near_zero)
    g = torch.cat([near_one, near_zero, mixed], dim=-1)
    theta = torch.linspace(-3, 3, D) if complex_mode else None
    h, h_last = hgrn_scan(x, g, theta=theta, output_final_state=True, backend=backend)
    assert torch.isfinite(h).all() and torch.isfinite(h_last).all()
    with torch.no_grad():
        ref, ref_last = hgrn_scan_reference(x, g, theta=theta)
    positions = torch.cat([torch.arange(0, T, 997), torch.tensor([T - 1])])
    tol = TOLERANCE[torch.float32]
    assert (h[:, positions].double() - ref[:, positions]).norm() <= tol * ref[:, positions].norm()
    assert (h_last.double() - ref_last).norm() <= tol * ref_last.norm()

    def grads(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, g)]
        th = theta.detach().to(dtype).requires_grad_() if complex_mode else None
        out, last = hgrn_scan(leaves[0], leaves[1], theta=th, output_final_state=True, backend=backend)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype)
        ((out * w).sum() + last.sum()).backward()
        return [t.grad for t in leaves] + ([th.grad] if complex_mode else [])

    for got, want in zip(grads(torch.float32), grads(torch.float64)):
        assert torch.isfinite(got).all()
        assert (got.double() - want).norm() <= tol * want.norm()
