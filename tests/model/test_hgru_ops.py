"""The HGRU's fused elementwise Functions against the plain autograd composition: values and every gradient
(float64 gradcheck, fp32 and bf16 against the composition), and what they save for the backward pass."""
import pytest
import torch
import torch.nn.functional as F

from hgrn_megatron.hgru_ops import gated_input, gated_norm
from hgrn_megatron.testing.memory import saved_tensor_bytes

pytestmark = pytest.mark.usefixtures("nan_filled_empty")  # an unwritten output reads as NaN


def composed_input(inputs, one_minus_lambda):
    pairs = inputs.shape[-1] // one_minus_lambda.shape[-1]
    x = F.silu(inputs.float()).unflatten(-1, (-1, pairs)) * one_minus_lambda.unsqueeze(-1)
    return x.flatten(-2).to(inputs.dtype)


def composed_norm(h, gate, weight, bias, eps):
    h32 = h.float()
    if bias is not None:
        y = F.layer_norm(h32, (h.shape[-1],), weight.float(), bias.float(), eps)
    else:
        y = h32 * torch.rsqrt(h32.square().mean(-1, keepdim=True) + eps) * weight.float()
    return (y * F.silu(gate.float())).to(h.dtype)


def _inputs(kind, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, S, C = 2, 5, 6
    if kind.startswith("input"):
        pairs = 2 if kind == "input-complex" else 1
        return [3 * torch.randn(B, S, pairs * C, generator=g, dtype=dtype),
                torch.rand(B, S, C, generator=g, dtype=torch.float64).to(torch.float32 if dtype != torch.float64
                                                                         else dtype)]
    F_ = 2 * C
    bias = torch.randn(F_, generator=g, dtype=dtype) if kind == "norm-layer" else None
    h = 2 + 3 * torch.randn(B, S, F_, generator=g, dtype=dtype)
    gate = 3 * torch.randn(B, S, F_, generator=g, dtype=dtype)
    return [h, gate, 1 + torch.randn(F_, generator=g, dtype=dtype), bias]


FUSED = {"input": gated_input, "norm": lambda h, gate, w, b: gated_norm(h, gate, w, b, 1e-5)}
COMPOSED = {"input": composed_input, "norm": lambda h, gate, w, b: composed_norm(h, gate, w, b, 1e-5)}
KINDS = ["input-real", "input-complex", "norm-layer", "norm-rms"]


@pytest.mark.parametrize("kind", KINDS)
def test_fused_gradcheck_float64(kind):
    inputs = [t.requires_grad_() if t is not None else None for t in _inputs(kind, torch.float64)]
    fn = FUSED[kind.split("-")[0]]
    assert torch.autograd.gradcheck(lambda *a: fn(*a), [t for t in inputs], eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_matches_composition(kind, dtype):
    op = kind.split("-")[0]
    results = []
    for fn in (FUSED[op], COMPOSED[op]):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in _inputs(kind, dtype)]
        out = fn(*leaves)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.dtype)
        (out.float() * weights.float()).sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves if t is not None])
    tol = 2e-6 if dtype == torch.float32 else 2e-2
    for got, want in zip(*results):
        assert got.dtype == want.dtype
        assert (got.double() - want.double()).norm() <= tol * want.double().norm(), kind


@pytest.mark.parametrize("kind", KINDS)
def test_fused_saves_less_than_the_composition(kind):
    """bf16 activations: the composition keeps fp32 copies and intermediates; the fused op its inputs."""
    op = kind.split("-")[0]
    saved = {}
    for name, fn in (("fused", FUSED[op]), ("composed", COMPOSED[op])):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in _inputs(kind, torch.bfloat16)]
        params = [t for t in leaves[2:] if t is not None]  # the norm's weight and bias are weights
        _, saved[name] = saved_tensor_bytes(lambda: fn(*leaves), params)
    assert saved["fused"] <= 0.5 * saved["composed"], saved


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_norm_without_gate(norm):
    """The mixer norm alone (models without an output gate): gradcheck in float64, and fp32 against the
    composition with no gate."""
    h, _, w, b = _inputs("norm-layer" if norm == "layernorm" else "norm-rms", torch.float64)
    leaves = [t.requires_grad_() for t in (h, w) + ((b,) if b is not None else ())]
    fn = lambda h, w, b=None: gated_norm(h, None, w, b, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)

    def composed(h, w, b=None):
        h32 = h.float()
        if b is not None:
            return F.layer_norm(h32, (h.shape[-1],), w.float(), b.float(), 1e-5)
        return h32 * torch.rsqrt(h32.square().mean(-1, keepdim=True) + 1e-5) * w.float()

    results = []
    for f in (fn, composed):
        xs = [t.detach().float().clone().requires_grad_() for t in leaves]
        out = f(*xs)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
        results.append([out.detach()] + [t.grad for t in xs])
    for got, want in zip(*results):
        assert (got.double() - want.double()).norm() <= 2e-6 * want.double().norm()
