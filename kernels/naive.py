"""The ground truth: the HGRN recurrence as a plain sequential loop in float64.

Slow by design (one step per token) and differentiable through ordinary autograd; every other backend is
tested against it. The recurrence is eq. (2)-(4) of Qin et al., "Hierarchically Gated Recurrent Neural
Network for Sequence Modeling" (NeurIPS 2023): h_t = λ_t ⊙ e^{iθ} ⊙ h_{t-1} + x_t with λ_t = exp(g_t).
"""
from __future__ import annotations

import torch


def hgrn_scan_reference(
    x: torch.Tensor,
    g: torch.Tensor,
    *,
    theta: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the recurrence step by step in float64; returns `(h, h_last)`, both float64.

    Shapes follow `hgrn_scan`: x `[B, T, D]` (real) or `[B, T, D, 2]` (complex, selected by theta `[D]`),
    g `[B, T, D]`, initial_state `[B, D]` / `[B, D, 2]`, reset bool `[B, T]`. h has x's shape; h_last is the
    state after the last token (`[B, D]` or `[B, D, 2]`). Gradients flow to every floating input (they
    arrive in each input's own dtype, through the float64 cast).
    """
    complex_mode = theta is not None
    B, T, D = g.shape
    g64 = g.double()
    if complex_mode:
        x64 = torch.view_as_complex(x.double().contiguous())
        theta64 = theta.double()
        rotation = torch.complex(torch.cos(theta64), torch.sin(theta64))  # e^{iθ}, [D]
    else:
        x64 = x.double()
    if initial_state is None:
        h = torch.zeros(B, D, dtype=x64.dtype, device=x.device)
    elif complex_mode:
        h = torch.view_as_complex(initial_state.double().contiguous())
    else:
        h = initial_state.double()

    # unbind once: indexing x64[:, t] inside the loop would make autograd build a full-size gradient per step.
    x_steps = x64.unbind(dim=1)
    g_steps = g64.unbind(dim=1)
    reset_steps = reset.unbind(dim=1) if reset is not None else None
    outputs = []
    for t in range(T):
        decay = torch.exp(g_steps[t])
        if complex_mode:
            decay = decay * rotation
        if reset is not None:
            # A document starts at t: forget everything before it (h_t = x_t).
            decay = torch.where(reset_steps[t][:, None], torch.zeros_like(decay), decay)
        h = decay * h + x_steps[t]
        outputs.append(h)
    out = torch.stack(outputs, dim=1)
    if complex_mode:
        return torch.view_as_real(out), torch.view_as_real(h)
    return out, h
