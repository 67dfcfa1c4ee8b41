"""Forget-gate lower bounds (HGRN §3.2) and the gate arithmetic."""
import pytest
import torch

from hgrn_megatron.hgru_ops import forget_gate
from hgrn_megatron.testing.distributed import run_distributed
from tests.model.model_harness import batch, build, init_model_parallel, tiny_config


def _bounds_facts(cfg):
    init_model_parallel()
    model = build(cfg)
    facts = {"state_keys": sorted(k for k in model.state_dict() if not k.endswith("_extra_state")),
             "has_table": model.lower_bounds is not None}
    layer_bounds = [mixer.lower_bound() for mixer in (layer.self_attention for layer in model.decoder.layers)]
    facts["layer_bounds"] = [None if g is None else g.detach().clone() for g in layer_bounds]
    if model.lower_bounds is not None:
        facts["initial"] = model.lower_bounds().detach().clone()
        with torch.no_grad():
            model.lower_bounds.table.copy_(3.0 * torch.randn_like(model.lower_bounds.table))
        facts["trained_like"] = model.lower_bounds().detach().clone()
        ids, labels, _ = batch()
        model(ids, labels=labels).mean().backward()
        facts["table_grad"] = model.lower_bounds.table.grad.clone()
    return facts


@pytest.mark.distributed
def test_lower_bounds_are_zero_at_layer_0_monotone_in_depth_and_below_one():
    facts = run_distributed(_bounds_facts, world_size=1, args=(tiny_config(num_layers=5),), timeout=120)[0]
    assert facts["has_table"] and "lower_bounds.table" in facts["state_keys"]
    L = 5
    # A uniform softmax at initialisation: γ_k = k / L.
    expected = (torch.arange(L, dtype=torch.float32) / L)[:, None].expand_as(facts["initial"])
    torch.testing.assert_close(facts["initial"], expected, rtol=0, atol=1e-6)
    gamma = facts["trained_like"]  # after replacing the table by large random values
    assert torch.equal(gamma[0], torch.zeros_like(gamma[0]))
    assert (gamma[1:] > gamma[:-1]).all(), "γ must rise strictly with depth"
    assert (gamma < 1).all() and (gamma >= 0).all()
    # Layer k reads row k of the initial table; layer 0 needs no bound at all (γ = 0 exactly).
    assert facts["layer_bounds"][0] is None
    for k in range(1, L):
        torch.testing.assert_close(facts["layer_bounds"][k], facts["initial"][k], rtol=0, atol=0)
    assert facts["table_grad"].abs().sum() > 0, "the table must be learned"


@pytest.mark.distributed
def test_without_lower_bounds_the_table_is_absent():
    facts = run_distributed(_bounds_facts, world_size=1, args=(tiny_config(use_lower_bound=False),), timeout=120)[0]
    assert not facts["has_table"]
    assert not any("lower_bounds" in k for k in facts["state_keys"])
    assert facts["layer_bounds"] == [None, None]


def test_forget_gate_matches_float64_even_when_lambda_rounds_to_one():
    f = torch.tensor([-30.0, -3.0, 0.0, 3.0, 17.0, 30.0, 60.0])
    for gamma in (None, torch.tensor(0.0), torch.tensor(0.3), torch.tensor(0.999)):
        log_lambda, one_minus = forget_gate(f, gamma)
        g64 = 0.0 if gamma is None else gamma.double()
        lam64 = g64 + (1 - g64) * torch.sigmoid(f.double())
        one_minus64 = (1 - g64) * torch.sigmoid(-f.double())  # exact form of 1 − λ
        torch.testing.assert_close(one_minus.double(), one_minus64, rtol=1e-6, atol=0)
        # log λ in float64, accurate at both ends: log(λ) for small λ, log1p(−(1 − λ)) for λ near 1.
        log_lambda64 = torch.where(lam64 < 0.5, torch.log(lam64), torch.log1p(-one_minus64))
        torch.testing.assert_close(log_lambda.double(), log_lambda64, rtol=1e-5, atol=1e-37)
        assert (log_lambda.double().exp() >= (lam64 if gamma is None else g64) * (1 - 1e-6)).all()
        assert (one_minus > 0).all(), "1 − λ underflowed: the scan would lose its input"
        assert (log_lambda <= 0).all(), "the scan's log gate must be <= 0"
    # The naive fp32 form loses the information the stable form keeps (what the test above guards).
    lam32 = 0.3 + 0.7 * torch.sigmoid(torch.tensor(30.0))
    assert torch.log(lam32) == 0 and (1 - lam32) == 0


def test_forget_gate_gradient_matches_float64():
    f = torch.tensor([-40.0, -5.0, 0.5, 12.0, 25.0], requires_grad=True)
    gamma = torch.tensor([1e-4, 0.2, 0.5, 0.7, 0.9], requires_grad=True)
    log_lambda, one_minus = forget_gate(f, gamma)
    (log_lambda.sum() + 3 * one_minus.sum()).backward()
    f64, g64 = f.detach().double().requires_grad_(), gamma.detach().double().requires_grad_()
    lam = g64 + (1 - g64) * torch.sigmoid(f64)
    (torch.log(lam).sum() + 3 * ((1 - g64) * torch.sigmoid(-f64)).sum()).backward()
    torch.testing.assert_close(f.grad.double(), f64.grad, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(gamma.grad.double(), g64.grad, rtol=1e-5, atol=1e-12)
    # Without a bound, λ = σ(f) rounds to 0 for very negative f: gradients must stay finite there.
    f = torch.tensor([-120.0, -30.0, 0.0, 30.0], requires_grad=True)
    log_lambda, one_minus = forget_gate(f, None)
    (log_lambda.sum() + one_minus.sum()).backward()
    assert torch.isfinite(f.grad).all()


def test_forget_gate_saves_its_bf16_input_and_returns_a_bf16_gradient():
    """bf16 training: the backward keeps f as given (2 bytes per value, not an fp32 copy) and γ; the gradient
    comes back in bf16 and equals the fp32 computation's, rounded."""
    from hgrn_megatron.testing.memory import saved_tensor_bytes

    gen = torch.Generator().manual_seed(0)
    f = (3 * torch.randn(4, 64, 32, generator=gen)).bfloat16().requires_grad_()
    gamma = torch.rand(32, generator=gen).requires_grad_()
    (log_lambda, one_minus), saved = saved_tensor_bytes(lambda: forget_gate(f, gamma), [])
    assert saved == f.numel() * 2 + gamma.numel() * 4
    w = torch.randn(log_lambda.shape, generator=gen)
    (log_lambda * w + one_minus).sum().backward()
    f32 = f.detach().float().requires_grad_()
    a, b = forget_gate(f32, gamma.detach())
    (a * w + b).sum().backward()
    assert f.grad.dtype == torch.bfloat16 and torch.equal(f.grad, f32.grad.bfloat16())
