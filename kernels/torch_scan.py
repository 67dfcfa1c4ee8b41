"""The vectorised pure-torch scan: the CPU training path, and a fallback on any device.

Algorithm (chunked two-level scan, the CPU analogue of the Triton kernels): the sequence is cut into chunks
of L tokens. (1) For every chunk at once, a local scan with zero initial state gives the chunk's end state,
and exp(Σ g) its total decay; (2) a short sequential loop over chunks turns those into the state entering
each chunk; (3) a second local scan, again over all chunks at once, starts from that state and
writes h. Each local step is one fused `addcmul` over a `[B, n_chunks, D]` slice, so a sequence of T tokens
costs about 2L + T/L tensor operations instead of T. Decays are only ever multiplied, never divided, and every
factor is exp(g) <= 1, so nothing can overflow however long the sequence (the "scan" formulation of
Martin & Cundy, "Parallelizing Linear Recurrent Neural Nets Over Sequence Length", ICLR 2018).

CPU memory traffic and, above all, fresh large allocations (each page of a new tensor is faulted in by the
kernel) dominate the cost here, so the forward allocates exactly one full-size buffer: the decays
a = exp(g) are written into the output buffer and overwritten by h in place, step by step. The backward does
the same with its two outputs (dx holds the reverse scan, dg's buffer first holds the decays).

The reverse recurrence (gradient) is dh_t = do_t + conj(a_{t+1}) dh_{t+1}, dh_{T-1} = do_{T-1} + dh_last;
then dx_t = dh_t, dg_t = Re(conj(dh_t) a_t h_{t-1}), dθ = -Σ_t Im(conj(dh_t) a_t h_{t-1}) and
dh_init = conj(a_0) dh_0.
"""
from __future__ import annotations

import math

import torch


def default_chunk_size(T: int) -> int:
    """About sqrt(T), within [16, 128]: balances the 2L in-chunk steps against the T/L carry steps. At
    B=4, T=4096, D=512 (benchmarks/scan_cpu.py --chunk-sizes) L=64 used the least CPU time, real and complex."""
    return int(min(128, max(16, 2 ** round(math.log2(max(T, 1)) / 2))))


def _fill_decays(buffer: torch.Tensor, g: torch.Tensor, theta: torch.Tensor | None, conjugate: bool,
                 reset: torch.Tensor | None) -> None:
    """Write a_t = exp(g_t) (times e^{±iθ} when complex) into `buffer` [B, T, D] without other big allocations."""
    if theta is None:
        if g.dtype == buffer.dtype:
            torch.exp(g, out=buffer)
        else:  # widen first: exp in the narrow input dtype would round the decay
            buffer.copy_(g)
            buffer.exp_()
    else:
        pair = torch.view_as_real(buffer)
        real, imag = pair[..., 0], pair[..., 1]
        if g.dtype == real.dtype:
            torch.exp(g, out=real)
        else:
            real.copy_(g)
            real.exp_()
        phase = theta.to(real.dtype)
        torch.mul(real, -torch.sin(phase) if conjugate else torch.sin(phase), out=imag)
        real.mul_(torch.cos(phase))
    if reset is not None:
        # A document starts at t: the state is cleared before the update, i.e. the decay is zero.
        buffer[reset] = 0


def chunk_decays(g: torch.Tensor, theta: torch.Tensor | None, reset: torch.Tensor | None, chunk_size: int,
                 dtype: torch.dtype) -> torch.Tensor | None:
    """Total decay of each whole chunk, [B, T // L, D] (None when there are fewer than two chunks).

    Computed as exp(Σ g) (times e^{iLθ}, formed in float64) rather than as a product of the rounded
    decays: a product of fp32 numbers just below 1 is biased low (each rounding drops the δ1·δ2 term of
    (1 - δ1)(1 - δ2)), and across chunks the bias compounds: at T = 65,536 with decays near 1 it made the
    result ten times less accurate than a plain fp32 loop.
    """
    B, T, D = g.shape
    L = chunk_size
    n_chunks = T // L
    if n_chunks < 2:
        return None
    real_dtype = torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32
    log_total = g[:, : n_chunks * L].reshape(B, n_chunks, L, D).sum(dim=2, dtype=real_dtype)
    total = log_total.exp_()
    if reset is not None:
        total.masked_fill_(reset[:, : n_chunks * L].reshape(B, n_chunks, L).any(dim=2)[..., None], 0)
    if theta is not None:
        rotation = torch.polar(torch.ones_like(theta, dtype=torch.float64), theta.double() * L).to(dtype)
        total = total * rotation
    return total


def scan_forward(decays: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None, out: torch.Tensor,
                 chunk_size: int, chunk_decay: torch.Tensor | None) -> torch.Tensor:
    """h_t = decays_t * h_{t-1} + x_t for all t, written into `out` (which may hold `decays` itself).

    decays, x, out: [B, T, D] (real or complex, one dtype); h0: [B, D] or None. Returns the final state
    (a view into `out`). Reading decays_t and writing h_t at the same address is safe: each step is one
    elementwise op over identical memory. chunk_decay: `chunk_decays(...)` for the same chunk size.
    """
    B, T, D = x.shape
    L = chunk_size
    n_chunks = T // L
    state = h0 if h0 is not None else x.new_zeros(B, D)
    start = 0
    if chunk_decay is not None:
        T0 = n_chunks * L
        a = decays[:, :T0].view(B, n_chunks, L, D)
        xc = x[:, :T0].view(B, n_chunks, L, D)
        hc = out[:, :T0].view(B, n_chunks, L, D)
        # (1) end state of chunks 0..n-2 from a zero start (the last chunk's is not needed).
        local_end = xc[:, :-1, 0].clone()
        for i in range(1, L):
            torch.addcmul(xc[:, :-1, i], a[:, :-1, i], local_end, out=local_end)
        # (2) the state entering each chunk.
        entering = x.new_empty(B, n_chunks, D)
        entering[:, 0] = state
        for c in range(n_chunks - 1):
            torch.addcmul(local_end[:, c], chunk_decay[:, c], entering[:, c], out=entering[:, c + 1])
        # (3) every chunk again, from its true entering state; overwrites the decays with h.
        torch.addcmul(xc[:, :, 0], a[:, :, 0], entering, out=hc[:, :, 0])
        for i in range(1, L):
            torch.addcmul(xc[:, :, i], a[:, :, i], hc[:, :, i - 1], out=hc[:, :, i])
        state = out[:, T0 - 1]
        start = T0
    for t in range(start, T):  # the remainder (< 2L tokens), token by token
        state = torch.addcmul(x[:, t], decays[:, t], state, out=out[:, t])
    return state


def scan_backward(decays: torch.Tensor, dout: torch.Tensor, dlast: torch.Tensor | None, out: torch.Tensor,
                  chunk_size: int, chunk_decay: torch.Tensor | None) -> None:
    """Reverse scan dh_t = dout_t + decays_{t+1} * dh_{t+1}, with dh_{T-1} = dout_{T-1} + dlast, into `out`.

    `decays` and `chunk_decay` already hold conj(a) for complex inputs. Chunks are aligned as in
    `scan_forward`, so the remainder is processed first. `out` must not alias `decays` (they are read
    shifted by one token).
    """
    B, T, D = dout.shape
    L = chunk_size
    n_chunks = chunk_decay.shape[1] if chunk_decay is not None else 0
    T0 = n_chunks * L
    incoming = dlast if dlast is not None else dout.new_zeros(B, D)  # decays_T is taken to be 1
    for t in range(T - 1, T0 - 1, -1):
        incoming = torch.add(dout[:, t], incoming, out=out[:, t])
        if t > 0:
            incoming = incoming * decays[:, t]
    if n_chunks == 0:
        return
    a = decays[:, :T0].view(B, n_chunks, L, D)
    dc = dout[:, :T0].view(B, n_chunks, L, D)
    hc = out[:, :T0].view(B, n_chunks, L, D)
    # (1) for chunks 1..n-1: what each passes to the previous chunk from a zero incoming gradient.
    passed = dc[:, 1:, L - 1].clone()
    for i in range(L - 2, -1, -1):
        torch.addcmul(dc[:, 1:, i], a[:, 1:, i + 1], passed, out=passed)
    passed.mul_(a[:, 1:, 0])
    # (2) the gradient arriving at the last token of each chunk from the chunks after it.
    arriving = dout.new_empty(B, n_chunks, D)
    arriving[:, n_chunks - 1] = incoming
    for c in range(n_chunks - 1, 0, -1):
        torch.addcmul(passed[:, c - 1], chunk_decay[:, c], arriving[:, c], out=arriving[:, c - 1])
    # (3) every chunk from its true arriving gradient.
    torch.add(dc[:, :, L - 1], arriving, out=hc[:, :, L - 1])
    for i in range(L - 2, -1, -1):
        torch.addcmul(dc[:, :, i], a[:, :, i + 1], hc[:, :, i + 1], out=hc[:, :, i])


class TorchScanFunction(torch.autograd.Function):
    """Autograd wrapper: inputs already checked and shaped by `hgrn_scan` (complex x as [B, T, D, 2])."""

    @staticmethod
    def forward(ctx, x, g, theta, initial_state, reset, output_final_state, chunk_size):
        ctx.set_materialize_grads(False)  # an unused h or h_last arrives as None: no zero tensor is read
        complex_mode = theta is not None
        real_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        state_dtype = (torch.complex128 if real_dtype == torch.float64 else torch.complex64) if complex_mode \
            else real_dtype
        B, T, D = g.shape
        xs = _as_state(x, real_dtype, complex_mode)
        h0 = _as_state(initial_state, real_dtype, complex_mode) if initial_state is not None else None
        h = torch.empty(B, T, D, dtype=state_dtype, device=x.device)
        _fill_decays(h, g, theta, conjugate=False, reset=reset)
        chunk_decay = chunk_decays(g, theta, reset, chunk_size, state_dtype)
        final = scan_forward(h, xs, h0, h, chunk_size, chunk_decay)

        out = torch.view_as_real(h) if complex_mode else h
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        h_last = None
        if output_final_state:
            h_last = final.clone()
            h_last = torch.view_as_real(h_last) if complex_mode else h_last
        # The fp32 state itself is saved (it *is* the output when x is fp32): dg needs h_{t-1} unrounded.
        ctx.save_for_backward(g, theta, h0, reset, h, chunk_decay)
        ctx.chunk_size = chunk_size
        ctx.x_dtype = x.dtype
        ctx.has_initial_state = initial_state is not None
        ctx.initial_dtype = initial_state.dtype if initial_state is not None else None
        return out, h_last

    @staticmethod
    def backward(ctx, dout, dlast):
        g, theta, h0, reset, h, chunk_decay = ctx.saved_tensors
        complex_mode = theta is not None
        real_dtype = h.real.dtype if complex_mode else h.dtype
        B, T, D = g.shape
        if dout is None:
            dout_s = h.new_zeros(B, T, D)
        else:
            dout_s = _as_state(dout, real_dtype, complex_mode)
        dlast_s = _as_state(dlast, real_dtype, complex_mode) if dlast is not None else None

        decays = torch.empty_like(h)  # conj(a); becomes dg's buffer below
        _fill_decays(decays, g, theta, conjugate=True, reset=reset)
        dh = torch.empty_like(h)
        if complex_mode and chunk_decay is not None:
            chunk_decay = chunk_decay.conj_physical()
        scan_backward(decays, dout_s, dlast_s, dh, ctx.chunk_size, chunk_decay)

        # p_t = conj(a_t) dh_t; then w_t = conj(p_t) h_{t-1} = conj(dh_t) a_t h_{t-1}: dg = Re w, dθ = -Σ Im w.
        p = decays.mul_(dh)
        dh0 = p[:, 0].clone() if ctx.has_initial_state else None  # conj(a_0) dh_0
        w = p.conj_physical_() if complex_mode else p  # in place: conj views would be copied by mul_
        w[:, 1:].mul_(h[:, :-1])
        if h0 is not None:
            w[:, 0].mul_(h0)
        else:
            w[:, 0].zero_()
        dtheta = None
        if complex_mode:
            if ctx.needs_input_grad[2]:
                # Sum over (B, T) as a contiguous reduction of the interleaved pairs (a strided .imag is slow).
                dtheta = -torch.view_as_real(w).reshape(B * T, D, 2).sum(dim=0)[:, 1].to(theta.dtype)
            # A strided view of w, not a copy: a fresh [B, T, D] buffer costs more in page faults than the
            # consumer pays for the stride (leaf tensors get a contiguous .grad from autograd anyway).
            dg = w.real.to(g.dtype) if ctx.needs_input_grad[1] else None
            dx = torch.view_as_real(dh)
        else:
            dg = w.to(g.dtype) if ctx.needs_input_grad[1] else None
            dx = dh
        dx = dx.to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        if dh0 is not None:
            dh0 = (torch.view_as_real(dh0) if complex_mode else dh0).to(ctx.initial_dtype)
        return dx, dg, dtheta, dh0, None, None, None


def _as_state(t: torch.Tensor, real_dtype: torch.dtype, complex_mode: bool) -> torch.Tensor:
    """Widen to the accumulation dtype; complex tensors arrive as [..., 2] pairs and leave as a complex view."""
    t = t.to(real_dtype)
    return torch.view_as_complex(t.contiguous()) if complex_mode else t.contiguous()


def torch_scan(x, g, *, theta=None, initial_state=None, output_final_state=False, reset=None, chunk_size=None):
    """Vectorised torch path of `hgrn_scan` (same contract; inputs are assumed checked)."""
    if chunk_size is None:
        chunk_size = default_chunk_size(g.shape[1])
    return TorchScanFunction.apply(x, g, theta, initial_state, reset, output_final_state, chunk_size)
