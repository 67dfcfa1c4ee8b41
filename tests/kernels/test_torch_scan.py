"""The vectorised torch path against the float64 reference: values, gradients, gradcheck, long sequences."""
import functools

import pytest
import torch
from scan_cases import TOLERANCE, Case, assert_close_to_reference, make_inputs, reference, run

from hgrn_megatron.kernels import hgrn_scan, hgrn_scan_reference
from hgrn_megatron.kernels.torch_scan import default_chunk_size, torch_scan

CASES = [
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
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_torch_matches_reference(case):
    inputs = make_inputs(case)
    scan = functools.partial(hgrn_scan, backend="torch", output_final_state=bool(case.final),
                             chunk_size=case.chunk_size)
    out = run(scan, case, inputs)
    assert out["h"].dtype == case.dtype
    assert out["dx"].dtype == case.dtype and out["dg"].dtype == case.dtype
    if case.final:
        assert out["h_last"].dtype == torch.float32
    assert_close_to_reference(out, reference(case, inputs), TOLERANCE[case.dtype])


@pytest.mark.parametrize("variant", ["real", "complex"])
def test_torch_gradcheck_float64(variant):
    """Finite differences in float64 through the chunked path (T=11, chunks of 2: carries and a tail)."""
    complex_mode = variant == "complex"
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
        return torch_scan(x, g, theta=theta, initial_state=h0, reset=reset, output_final_state=True, chunk_size=2)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_default_chunk_size_is_about_sqrt_t():
    assert [default_chunk_size(T) for T in (1, 64, 4096, 65536, 10**7)] == [16, 16, 64, 128, 128]


@pytest.mark.parametrize("variant", ["real", "complex"])
def test_torch_long_sequence_is_stable(variant):
    """T = 65,536 with decays at both extremes: finite, and equal to the float64 loop at sampled positions."""
    complex_mode = variant == "complex"
    gen = torch.Generator().manual_seed(3)
    B, T, D = 1, 65536, 6
    x = torch.randn((B, T, D, 2) if complex_mode else (B, T, D), generator=gen)
    # Channel pairs: decay ~ 1 (g = -1e-6 .. -1e-4), decay ~ 0 (g down to -80), and a mixture in time.
    near_one = -10 ** (-6 + 2 * torch.rand(B, T, 2, generator=gen))
    near_zero = -80 * torch.rand(B, T, 2, generator=gen)
    mixed = torch.where(torch.rand(B, T, 2, generator=gen) < 0.5, near_one, near_zero)
    g = torch.cat([near_one, near_zero, mixed], dim=-1)
    theta = torch.linspace(-3, 3, D) if complex_mode else None
    h, h_last = hgrn_scan(x, g, theta=theta, output_final_state=True, backend="torch")
    assert torch.isfinite(h).all() and torch.isfinite(h_last).all()
    with torch.no_grad():
        ref, ref_last = hgrn_scan_reference(x, g, theta=theta)
    positions = torch.cat([torch.arange(0, T, 997), torch.tensor([T - 1])])
    tol = TOLERANCE[torch.float32]
    assert (h[:, positions].double() - ref[:, positions]).norm() <= tol * ref[:, positions].norm()
    assert (h_last.double() - ref_last).norm() <= tol * ref_last.norm()

    # Gradients at this length: fp32 against the same path in float64 (itself checked by gradcheck).
    def grads(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, g)]
        th = theta.detach().to(dtype).requires_grad_() if complex_mode else None
        out, last = torch_scan(leaves[0], leaves[1], theta=th, output_final_state=True)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype)
        ((out * w).sum() + last.sum()).backward()
        return [t.grad for t in leaves] + ([th.grad] if complex_mode else [])

    for got, want in zip(grads(torch.float32), grads(torch.float64)):
        assert torch.isfinite(got).all()
        assert (got.double() - want).norm() <= tol * want.norm()
