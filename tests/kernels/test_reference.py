"""The float64 reference loop against closed forms and document semantics (everything else trusts it)."""
import math

import pytest
import torch

from hgrn_megatron.kernels import hgrn_scan_reference


def _powers_matrix(decay: torch.Tensor, T: int) -> torch.Tensor:
    """M[t, s, d] = decay[d]^(t-s) for s <= t, else 0 (decay real or complex)."""
    t = torch.arange(T)
    lag = (t[:, None] - t[None, :]).clamp(min=0)
    M = decay[None, None, :] ** lag[:, :, None]
    return M * (t[:, None] >= t[None, :])[:, :, None]


@pytest.mark.parametrize("variant", ["real", "complex"])
def test_reference_matches_closed_form_for_constant_gates(variant):
    B, T, D = 2, 23, 5
    gen = torch.Generator().manual_seed(0)
    log_decay = -torch.rand(D, generator=gen, dtype=torch.float64)
    g = log_decay.expand(B, T, D).clone()
    h0 = torch.randn(B, D, 2, generator=gen, dtype=torch.float64)
    if variant == "complex":
        theta = (torch.rand(D, generator=gen, dtype=torch.float64) * 2 - 1) * math.pi
        x = torch.randn(B, T, D, 2, generator=gen, dtype=torch.float64)
        decay = torch.exp(log_decay) * torch.exp(1j * theta)
        xc, h0c = torch.view_as_complex(x), torch.view_as_complex(h0)
        h, h_last = hgrn_scan_reference(x, g, theta=theta, initial_state=h0)
        h, h_last = torch.view_as_complex(h), torch.view_as_complex(h_last)
    else:
        x = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
        decay = torch.exp(log_decay)
        xc, h0c = x, h0[..., 0]
        h, h_last = hgrn_scan_reference(x, g, initial_state=h0c)
    M = _powers_matrix(decay, T)
    # h_t = sum_s decay^(t-s) x_s + decay^(t+1) h0
    expected = torch.einsum("tsd,bsd->btd", M, xc) + decay ** torch.arange(1, T + 1)[:, None] * h0c[:, None, :]
    torch.testing.assert_close(h, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_last, expected[:, -1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["real", "complex"])
def test_reference_reset_equals_separate_documents(variant):
    """Packed documents with resets at their first tokens == each document scanned alone from zero."""
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 1, 1, 9, 4]  # includes consecutive one-token documents
    T, D = sum(lengths), 3
    complex_mode = variant == "complex"
    x = torch.randn((1, T, D, 2) if complex_mode else (1, T, D), generator=gen, dtype=torch.float64)
    g = torch.nn.functional.logsigmoid(torch.randn(1, T, D, generator=gen, dtype=torch.float64))
    theta = torch.randn(D, generator=gen, dtype=torch.float64) if complex_mode else None
    h0 = torch.randn((1, D, 2) if complex_mode else (1, D), generator=gen, dtype=torch.float64)
    reset = torch.zeros(1, T, dtype=torch.bool)
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    reset[0, starts] = True
    packed, _ = hgrn_scan_reference(x, g, theta=theta, initial_state=h0, reset=reset)
    for start, length in zip(starts.tolist(), lengths):
        alone, _ = hgrn_scan_reference(x[:, start:start + length], g[:, start:start + length], theta=theta)
        torch.testing.assert_close(packed[:, start:start + length], alone, rtol=0, atol=0)


def test_reference_agrees_with_fla_naive_loop():
    """An independent implementation (flash-linear-attention's float32 loop), where installed."""
    naive = pytest.importorskip("fla.ops.hgrn.naive")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 37, 11, generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn(2, 37, 11, generator=gen))
    h0 = torch.randn(2, 11, generator=gen)
    ours, ours_last = hgrn_scan_reference(x, g, initial_state=h0)
    theirs, theirs_last = naive.naive_recurrent_hgrn(x, g, h0, output_final_state=True)
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_last.float(), theirs_last, rtol=1e-5, atol=1e-5)
