"""Chunked Triton kernels for the HGRN scan (real and complex), forward and backward (launched from
`triton_scan.py`, which owns the autograd wiring and the block-size choices).

Layout: x [B, T, D] or [B, T, D, 2] (interleaved real, imaginary), g [B, T, D], reset [B, T] (uint8).
The time axis is cut into chunks of BT tokens and the channels into blocks of BD. Each direction runs three
kernels, fla-style names `chunk_hgrn_<fwd|bwd>_kernel_<part>` (cf. fla `ops/hgrn/chunk.py`):

  summary  grid (NT, ND, B)  scan each chunk from a zero state: its end state and its Σ log-gate
  carry    grid (ND, B)      scan the [B, NT, D] chunk summaries, NTB chunks at a time, in log space
                             (exp(Σ g) e^{inθ}, never a product of decays): the state entering each chunk
  output / grads  (NT, ND, B)  rescan each chunk from its entering state; write h (or dx, dg, dθ partials)

In-chunk scans are `tl.associative_scan` over (decay, value) pairs with the combine
(a1, h1) ∘ (a2, h2) = (a2 a1, a2 h1 + h2): decays are only multiplied (all |a| <= 1), never divided, so
no exponential of a positive number appears however long T is. Complex numbers travel as (re, im) pairs;
θ enters as cos θ, sin θ per channel. A reset clears the state: its decay is zero (its log-gate -inf).
Padding rows past T (and, in the backward, the step past the last token) carry the identity decay 1.

Backward: dh_t = do_t + conj(a_{t+1}) dh_{t+1} with dh_{T-1} = do_{T-1} + dh_last (reverse scan);
dx = dh; dg_t = Re(conj(dh_t) a_t h_{t-1}); dθ = -Σ Im(conj(dh_t) a_t h_{t-1}); dh_init = conj(a_0) dh_0.
h_{t-1} is recomputed exactly in fp32 by a scan over the inputs shifted by one token, started from the
chunk's entering state saved by the forward ([B, NT, D], 1/BT of the activations), so nothing full-size is
kept beyond the inputs.

Memory traffic per token and channel: forward reads x, g twice and writes h once; backward reads do, g
twice and x once and writes dx, dg. (fla's chunk kernel writes and re-reads fp32 h and cumulative gates.)
Offsets into the [B, T, D] tensors are int64.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _combine_real(a1, h1, a2, h2):
    return a2 * a1, a2 * h1 + h2


@triton.jit
def _combine_complex(ar1, ai1, hr1, hi1, ar2, ai2, hr2, hi2):
    return (ar2 * ar1 - ai2 * ai1, ar2 * ai1 + ai2 * ar1,
            ar2 * hr1 - ai2 * hi1 + hr2, ar2 * hi1 + ai2 * hr1 + hi2)


@triton.jit
def _decays(g, reset, b_cos, b_sin, i_b, o_t, o_d, m_d, T, D: tl.constexpr,
            COMPLEX: tl.constexpr, HAS_RESET: tl.constexpr, CONJ: tl.constexpr):
    """Decays a_t = exp(g_t) e^{±iθ} at rows o_t ([BT], int64, may lie outside [0, T)): 1 outside.

    Returns (re, im, log-magnitude); the log-magnitude is -inf at resets and 0 outside [0, T).
    """
    m_t = (o_t >= 0) & (o_t < T)
    mask = m_t[:, None] & m_d[None, :]
    b_lg = tl.load(g + (i_b * T + o_t[:, None]) * D + o_d[None, :], mask=mask, other=0.).to(tl.float32)
    if HAS_RESET:
        b_r = tl.load(reset + i_b * T + o_t, mask=m_t, other=0)
        b_lg = tl.where(b_r[:, None] != 0, float("-inf"), b_lg)
    b_lam = tl.exp(b_lg)
    if COMPLEX:
        b_ar = tl.where(m_t[:, None], b_lam * b_cos[None, :], 1.)
        if CONJ:
            b_ai = tl.where(m_t[:, None], -b_lam * b_sin[None, :], 0.)
        else:
            b_ai = tl.where(m_t[:, None], b_lam * b_sin[None, :], 0.)
    else:
        b_ar = b_lam
        b_ai = tl.zeros_like(b_lam)
    return b_ar, b_ai, b_lg


@triton.jit
def _rotation(n, b_th):
    """cos(nθ), sin(nθ) accurate to fp32 for an integer-valued fp32 n however large nθ is: the fma recovers
    the rounding error of n·θ (hi + lo = nθ exactly), then cos(hi + lo) ≈ cos hi - lo sin hi."""
    b_hi = n * b_th
    b_lo = tl.fma(n, b_th, -b_hi)
    b_c = tl.cos(b_hi)
    b_s = tl.sin(b_hi)
    return b_c - b_lo * b_s, b_s + b_lo * b_c


@triton.jit
def _combine_log_real(l1, h1, l2, h2):
    return l1 + l2, tl.exp(l2) * h1 + h2


@triton.jit
def _combine_log_complex(l1, n1, th1, hr1, hi1, l2, n2, th2, hr2, hi2):
    b_c, b_s = _rotation(n2, th2)
    b_m = tl.exp(l2)
    return l1 + l2, n1 + n2, th2, b_m * (b_c * hr1 - b_s * hi1) + hr2, b_m * (b_c * hi1 + b_s * hr1) + hi2


@triton.jit
def _scan_chunks(b_l, b_n, b_th, b_hr, b_hi, COMPLEX: tl.constexpr, REVERSE: tl.constexpr):
    """Scan over chunk summaries in log space: a segment is (Σ log-magnitude, rotating steps n, θ, state).

    Chunk decays are never multiplied together: a segment's decay is exp(Σ log) e^{inθ}, exact to fp32
    rounding. (Products of fp32 numbers just below 1 are biased low, and that bias would compound over
    the chunks of a long sequence.)
    """
    if COMPLEX:
        b_l, b_n, b_th, b_hr, b_hi = tl.associative_scan((b_l, b_n, b_th, b_hr, b_hi), axis=0,
                                                         combine_fn=_combine_log_complex, reverse=REVERSE)
    else:
        b_l, b_hr = tl.associative_scan((b_l, b_hr), axis=0, combine_fn=_combine_log_real, reverse=REVERSE)
    return b_l, b_n, b_hr, b_hi


@triton.jit
def _apply_segment(b_l, b_n, b_th, b_hr, b_hi, b_sr, b_si, COMPLEX: tl.constexpr):
    """State after a scanned segment entered with state s: h + exp(l) e^{inθ} s."""
    b_m = tl.exp(b_l)
    if COMPLEX:
        b_c, b_s = _rotation(b_n, b_th)
        b_ar = b_m * b_c
        b_ai = b_m * b_s
        return (b_hr + b_ar * b_sr[None, :] - b_ai * b_si[None, :],
                b_hi + b_ar * b_si[None, :] + b_ai * b_sr[None, :])
    return b_hr + b_m * b_sr[None, :], b_hi


@triton.jit
def _load_values(x, i_b, o_t, o_d, m_d, T, D: tl.constexpr, COMPLEX: tl.constexpr):
    """x at rows o_t as fp32 (re, im); 0 outside [0, T)."""
    m_t = (o_t >= 0) & (o_t < T)
    mask = m_t[:, None] & m_d[None, :]
    offs = (i_b * T + o_t[:, None]) * D + o_d[None, :]
    if COMPLEX:
        b_xr = tl.load(x + offs * 2, mask=mask, other=0.).to(tl.float32)
        b_xi = tl.load(x + offs * 2 + 1, mask=mask, other=0.).to(tl.float32)
    else:
        b_xr = tl.load(x + offs, mask=mask, other=0.).to(tl.float32)
        b_xi = tl.zeros_like(b_xr)
    return b_xr, b_xi


@triton.jit
def _scan(b_ar, b_ai, b_xr, b_xi, COMPLEX: tl.constexpr, REVERSE: tl.constexpr):
    """Inclusive scan along the chunk axis: (cumulative decay, state from a zero start) as (re, im) pairs."""
    if COMPLEX:
        b_ar, b_ai, b_xr, b_xi = tl.associative_scan((b_ar, b_ai, b_xr, b_xi), axis=0,
                                                     combine_fn=_combine_complex, reverse=REVERSE)
    else:
        b_ar, b_xr = tl.associative_scan((b_ar, b_xr), axis=0, combine_fn=_combine_real, reverse=REVERSE)
    return b_ar, b_ai, b_xr, b_xi


@triton.jit
def _row(b, o_row, ROW: tl.constexpr):
    """Row ROW of a [BT, BD] block, as [BD]."""
    return tl.sum(tl.where((o_row == ROW)[:, None], b, 0.), axis=0)


@triton.jit
def _theta(theta, o_d, m_d, COMPLEX: tl.constexpr, BD: tl.constexpr):
    """(θ, cos θ, sin θ) for the channel block, fp32 [BD] (zeros for the real variant)."""
    if COMPLEX:
        b_th = tl.load(theta + o_d, mask=m_d, other=0.).to(tl.float32)
        return b_th, tl.cos(b_th), tl.sin(b_th)
    b_zero = tl.zeros([BD], dtype=tl.float32)
    return b_zero, b_zero, b_zero


@triton.jit
def _load_pair(p, offs, mask, COMPLEX: tl.constexpr):
    """A [BD] fp32 state from a [..., D, C] buffer (C = 2 if complex else 1)."""
    if COMPLEX:
        return (tl.load(p + offs * 2, mask=mask, other=0.).to(tl.float32),
                tl.load(p + offs * 2 + 1, mask=mask, other=0.).to(tl.float32))
    b = tl.load(p + offs, mask=mask, other=0.).to(tl.float32)
    return b, tl.zeros_like(b)


@triton.jit
def _store_pair(p, offs, b_re, b_im, mask, COMPLEX: tl.constexpr):
    if COMPLEX:
        tl.store(p + offs * 2, b_re.to(p.dtype.element_ty), mask=mask)
        tl.store(p + offs * 2 + 1, b_im.to(p.dtype.element_ty), mask=mask)
    else:
        tl.store(p + offs, b_re.to(p.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["T"])
def chunk_hgrn_fwd_kernel_summary(x, g, theta, reset, chunk_lg, chunk_h, T, D: tl.constexpr, BT: tl.constexpr,
                                  BD: tl.constexpr, COMPLEX: tl.constexpr, HAS_RESET: tl.constexpr):
    i_t, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    NT = tl.num_programs(0)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_row = tl.arange(0, BT)
    o_t = i_t.to(tl.int64) * BT + o_row
    b_th, b_cos, b_sin = _theta(theta, o_d, m_d, COMPLEX, BD)
    b_ar, b_ai, b_lg = _decays(g, reset, b_cos, b_sin, i_b, o_t, o_d, m_d, T, D, COMPLEX, HAS_RESET, False)
    b_xr, b_xi = _load_values(x, i_b, o_t, o_d, m_d, T, D, COMPLEX)
    b_ar, b_ai, b_hr, b_hi = _scan(b_ar, b_ai, b_xr, b_xi, COMPLEX, False)
    offs = (i_b * NT + i_t) * D + o_d
    tl.store(chunk_lg + offs, tl.sum(b_lg, axis=0), mask=m_d)
    _store_pair(chunk_h, offs, _row(b_hr, o_row, BT - 1), _row(b_hi, o_row, BT - 1), m_d, COMPLEX)


@triton.jit(do_not_specialize=["T", "NT"])
def chunk_hgrn_fwd_kernel_carry(chunk_lg, chunk_h, theta, h0, entering, ht, T, NT, D: tl.constexpr,
                                BT: tl.constexpr, BD: tl.constexpr, NTB: tl.constexpr, COMPLEX: tl.constexpr,
                                HAS_INITIAL: tl.constexpr, STORE_FINAL: tl.constexpr):
    """The state entering every chunk: blocks of NTB chunk summaries scanned in parallel, blocks in order."""
    i_d, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    b_th, _, _ = _theta(theta, o_d, m_d, COMPLEX, BD)
    b_thc = tl.zeros([NTB, BD], dtype=tl.float32) + b_th[None, :]
    b_sr = tl.zeros([BD], dtype=tl.float32)
    b_si = tl.zeros([BD], dtype=tl.float32)
    if HAS_INITIAL:
        b_sr, b_si = _load_pair(h0, i_b * D + o_d, m_d, COMPLEX)
    o_row = tl.arange(0, NTB)
    for i_blk in range(tl.cdiv(NT, NTB)):
        o_c = i_blk * NTB + o_row
        m_c = o_c < NT
        mask = m_c[:, None] & m_d[None, :]
        offs = (i_b * NT + o_c[:, None]) * D + o_d[None, :]
        b_l = tl.load(chunk_lg + offs, mask=mask, other=0.)
        b_n = tl.zeros([NTB, BD], dtype=tl.float32) + tl.where(m_c, tl.minimum(T - o_c * BT, BT), 0).to(
            tl.float32)[:, None]
        b_hr, b_hi = _load_pair(chunk_h, offs, mask, COMPLEX)
        b_l, b_n, b_hr, b_hi = _scan_chunks(b_l, b_n, b_thc, b_hr, b_hi, COMPLEX, False)
        b_ar, b_ai = _apply_segment(b_l, b_n, b_thc, b_hr, b_hi, b_sr, b_si, COMPLEX)  # state after chunk
        first = i_b * NT * D + i_blk * NTB * D + o_d
        _store_pair(entering, first, b_sr, b_si, m_d, COMPLEX)
        _store_pair(entering, offs + D, b_ar, b_ai, ((o_c + 1) < NT)[:, None] & m_d[None, :], COMPLEX)
        # Rows past NT scanned identities, so the last row is the state after the block's last chunk.
        b_sr = _row(b_ar, o_row, NTB - 1)
        b_si = _row(b_ai, o_row, NTB - 1)
    if STORE_FINAL:
        _store_pair(ht, i_b * D + o_d, b_sr, b_si, m_d, COMPLEX)


@triton.jit(do_not_specialize=["T"])
def chunk_hgrn_fwd_kernel_output(x, g, theta, reset, entering, out, T, D: tl.constexpr, BT: tl.constexpr,
                                 BD: tl.constexpr, COMPLEX: tl.constexpr, HAS_RESET: tl.constexpr):
    i_t, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    NT = tl.num_programs(0)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_t = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    b_th, b_cos, b_sin = _theta(theta, o_d, m_d, COMPLEX, BD)
    b_ar, b_ai, _ = _decays(g, reset, b_cos, b_sin, i_b, o_t, o_d, m_d, T, D, COMPLEX, HAS_RESET, False)
    b_xr, b_xi = _load_values(x, i_b, o_t, o_d, m_d, T, D, COMPLEX)
    b_ar, b_ai, b_hr, b_hi = _scan(b_ar, b_ai, b_xr, b_xi, COMPLEX, False)
    b_sr, b_si = _load_pair(entering, (i_b * NT + i_t) * D + o_d, m_d, COMPLEX)
    b_hr += b_ar * b_sr[None, :] - b_ai * b_si[None, :]
    b_hi += b_ar * b_si[None, :] + b_ai * b_sr[None, :]
    mask = (o_t < T)[:, None] & m_d[None, :]
    _store_pair(out, (i_b * T + o_t[:, None]) * D + o_d[None, :], b_hr, b_hi, mask, COMPLEX)


@triton.jit(do_not_specialize=["T", "NT"])
def chunk_hgrn_fwd_kernel_single_pass(x, g, theta, reset, h0, entering, out, ht, T, NT, D: tl.constexpr,
                                      BT: tl.constexpr, BD: tl.constexpr, COMPLEX: tl.constexpr,
                                      HAS_RESET: tl.constexpr, HAS_INITIAL: tl.constexpr,
                                      STORE_FINAL: tl.constexpr):
    """The whole forward in one pass, grid (ND, B): each program walks its channel block's chunks in order,
    carrying the state, so x and g are read once (the summary/carry/output kernels read them twice). It also
    writes the entering state of every chunk, which the backward kernels need.

    The state enters a chunk through exp(Σ log-gate) e^{inθ} (`_apply_segment`), not through the product of
    the chunk's rounded decays. The carried state itself is float64 from chunk to chunk (a [BD] vector): a
    sequential carry in fp32 compounds one rounding per chunk, which at T = 65,536 put the complex final state
    1.1e-5 off (the three-kernel carry combines chunks as a tree and stays at 2e-6). Parallel over B·ND
    programs only: for few of them the three-kernel path is faster (the launcher chooses).
    """
    i_d, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_row = tl.arange(0, BT)
    b_th, b_cos, b_sin = _theta(theta, o_d, m_d, COMPLEX, BD)
    b_thc = tl.zeros([BT, BD], dtype=tl.float32) + b_th[None, :]
    b_th64 = b_th.to(tl.float64)
    b_sr = tl.zeros([BD], dtype=tl.float64)
    b_si = tl.zeros([BD], dtype=tl.float64)
    if HAS_INITIAL:
        b_sr, b_si = _load_pair(h0, i_b * D + o_d, m_d, COMPLEX)
        b_sr, b_si = b_sr.to(tl.float64), b_si.to(tl.float64)
    for i_t in range(NT):
        o_t = i_t * BT + o_row.to(tl.int64)
        b_sr32, b_si32 = b_sr.to(tl.float32), b_si.to(tl.float32)
        _store_pair(entering, (i_b * NT + i_t) * D + o_d, b_sr32, b_si32, m_d, COMPLEX)
        b_ar, b_ai, b_lg = _decays(g, reset, b_cos, b_sin, i_b, o_t, o_d, m_d, T, D, COMPLEX, HAS_RESET, False)
        b_xr, b_xi = _load_values(x, i_b, o_t, o_d, m_d, T, D, COMPLEX)
        _, _, b_lr, b_li = _scan(b_ar, b_ai, b_xr, b_xi, COMPLEX, False)  # from a zero state
        # Rotating steps since the chunk began, frozen past T (padding rows carry the identity decay).
        n_valid = tl.minimum(T - i_t * BT, BT)
        b_steps = tl.zeros([BT, BD], dtype=tl.float32) + tl.minimum(o_row + 1, n_valid).to(tl.float32)[:, None]
        b_hr, b_hi = _apply_segment(tl.cumsum(b_lg, axis=0), b_steps, b_thc, b_lr, b_li, b_sr32, b_si32, COMPLEX)
        mask = (o_t < T)[:, None] & m_d[None, :]
        _store_pair(out, (i_b * T + o_t[:, None]) * D + o_d[None, :], b_hr, b_hi, mask, COMPLEX)
        # The state after the chunk, in float64: the local end state (rows past T scanned identities) plus
        # exp(Σ log-gate) e^{i n θ} times the entering state.
        b_decay = tl.exp(tl.sum(b_lg.to(tl.float64), axis=0))
        b_end_r = _row(b_lr, o_row, BT - 1).to(tl.float64)
        b_end_i = _row(b_li, o_row, BT - 1).to(tl.float64)
        if COMPLEX:
            b_c = tl.cos(n_valid * b_th64)
            b_s = tl.sin(n_valid * b_th64)
            b_sr, b_si = (b_end_r + b_decay * (b_c * b_sr - b_s * b_si),
                          b_end_i + b_decay * (b_c * b_si + b_s * b_sr))
        else:
            b_sr = b_end_r + b_decay * b_sr
    if STORE_FINAL:
        _store_pair(ht, i_b * D + o_d, b_sr.to(tl.float32), b_si.to(tl.float32), m_d, COMPLEX)


@triton.jit
def _reverse_inputs(do, g, reset, b_cos, b_sin, i_b, o_t, o_d, m_d, T, D: tl.constexpr,
                    COMPLEX: tl.constexpr, HAS_RESET: tl.constexpr):
    """(conj(a_{t+1}), do_t) for the reverse scan; the decay past the last token is 1 (dh_last enters as is)."""
    b_br, b_bi, b_lg = _decays(g, reset, b_cos, b_sin, i_b, o_t + 1, o_d, m_d, T, D, COMPLEX, HAS_RESET, True)
    b_dr, b_di = _load_values(do, i_b, o_t, o_d, m_d, T, D, COMPLEX)
    return b_br, b_bi, b_lg, b_dr, b_di


@triton.jit(do_not_specialize=["T"])
def chunk_hgrn_bwd_kernel_summary(do, g, theta, reset, chunk_lg, chunk_s, T, D: tl.constexpr, BT: tl.constexpr,
                                  BD: tl.constexpr, COMPLEX: tl.constexpr, HAS_RESET: tl.constexpr):
    i_t, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    NT = tl.num_programs(0)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_row = tl.arange(0, BT)
    o_t = i_t.to(tl.int64) * BT + o_row
    b_th, b_cos, b_sin = _theta(theta, o_d, m_d, COMPLEX, BD)
    b_br, b_bi, b_lg, b_dr, b_di = _reverse_inputs(do, g, reset, b_cos, b_sin, i_b, o_t, o_d, m_d, T, D,
                                                   COMPLEX, HAS_RESET)
    b_br, b_bi, b_sr, b_si = _scan(b_br, b_bi, b_dr, b_di, COMPLEX, True)
    offs = (i_b * NT + i_t) * D + o_d
    tl.store(chunk_lg + offs, tl.sum(b_lg, axis=0), mask=m_d)
    _store_pair(chunk_s, offs, _row(b_sr, o_row, 0), _row(b_si, o_row, 0), m_d, COMPLEX)


@triton.jit(do_not_specialize=["T", "NT"])
def chunk_hgrn_bwd_kernel_carry(chunk_lg, chunk_s, dht, g, theta, reset, arriving, dh0, T, NT, D: tl.constexpr,
                                BT: tl.constexpr, BD: tl.constexpr, NTB: tl.constexpr, COMPLEX: tl.constexpr,
                                HAS_RESET: tl.constexpr, HAS_FINAL_GRAD: tl.constexpr, HAS_INITIAL: tl.constexpr):
    """The gradient arriving at every chunk's last token from the chunks after it (reverse scan), and dh0."""
    i_d, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    b_th, b_cos, b_sin = _theta(theta, o_d, m_d, COMPLEX, BD)
    b_thc = tl.zeros([NTB, BD], dtype=tl.float32) - b_th[None, :]  # conj(a): rotation by -θ
    b_sr = tl.zeros([BD], dtype=tl.float32)
    b_si = tl.zeros([BD], dtype=tl.float32)
    if HAS_FINAL_GRAD:
        b_sr, b_si = _load_pair(dht, i_b * D + o_d, m_d, COMPLEX)
    o_row = tl.arange(0, NTB)
    n_blk = tl.cdiv(NT, NTB)
    for i in range(n_blk):
        i_blk = n_blk - 1 - i
        o_c = i_blk * NTB + o_row
        m_c = o_c < NT
        mask = m_c[:, None] & m_d[None, :]
        offs = (i_b * NT + o_c[:, None]) * D + o_d[None, :]
        b_l = tl.load(chunk_lg + offs, mask=mask, other=0.)
        # conj(a_{t+1}) rotates for every t of the chunk with t + 1 < T.
        n_rot = tl.maximum(tl.minimum(T - 1 - o_c * BT, BT), 0)
        b_n = tl.zeros([NTB, BD], dtype=tl.float32) + tl.where(m_c, n_rot, 0).to(tl.float32)[:, None]
        b_hr, b_hi = _load_pair(chunk_s, offs, mask, COMPLEX)
        b_l, b_n, b_hr, b_hi = _scan_chunks(b_l, b_n, b_thc, b_hr, b_hi, COMPLEX, True)
        b_fr, b_fi = _apply_segment(b_l, b_n, b_thc, b_hr, b_hi, b_sr, b_si, COMPLEX)  # dh at chunk's 1st token
        last = tl.minimum(NT - 1 - i_blk * NTB, NTB - 1)
        _store_pair(arriving, i_b * NT * D + (i_blk * NTB + last) * D + o_d, b_sr, b_si, m_d, COMPLEX)
        _store_pair(arriving, offs - D, b_fr, b_fi, ((o_c >= 1) & m_c)[:, None] & m_d[None, :], COMPLEX)
        # The reverse scan put the whole block into row 0 (rows past NT are identities).
        b_sr = _row(b_fr, o_row, 0)
        b_si = _row(b_fi, o_row, 0)
    if HAS_INITIAL:
        # b_s is now dh_0; the initial state's gradient is conj(a_0) dh_0.
        b_ar, b_ai, _ = _decays(g, reset, b_cos, b_sin, i_b, tl.zeros([1], dtype=tl.int64), o_d, m_d, T, D,
                                COMPLEX, HAS_RESET, True)
        b_ar = tl.sum(b_ar, axis=0)
        b_ai = tl.sum(b_ai, axis=0)
        _store_pair(dh0, i_b * D + o_d, b_ar * b_sr - b_ai * b_si, b_ar * b_si + b_ai * b_sr, m_d, COMPLEX)


@triton.jit(do_not_specialize=["T"])
def chunk_hgrn_bwd_kernel_grads(x, do, g, theta, reset, entering, arriving, dx, dg, dtheta_part, T,
                                D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, COMPLEX: tl.constexpr,
                                HAS_RESET: tl.constexpr):
    i_t, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    NT = tl.num_programs(0)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_row = tl.arange(0, BT)
    o_t = i_t.to(tl.int64) * BT + o_row
    offs_chunk = (i_b * NT + i_t) * D + o_d
    b_th, b_cos, b_sin = _theta(theta, o_d, m_d, COMPLEX, BD)

    # dh within the chunk: reverse scan from the gradient arriving from later chunks.
    b_br, b_bi, _, b_dr, b_di = _reverse_inputs(do, g, reset, b_cos, b_sin, i_b, o_t, o_d, m_d, T, D,
                                                COMPLEX, HAS_RESET)
    b_br, b_bi, b_sr, b_si = _scan(b_br, b_bi, b_dr, b_di, COMPLEX, True)
    b_cr, b_ci = _load_pair(arriving, offs_chunk, m_d, COMPLEX)
    b_sr += b_br * b_cr[None, :] - b_bi * b_ci[None, :]
    b_si += b_br * b_ci[None, :] + b_bi * b_cr[None, :]

    # h_{t-1}, exactly: scan the inputs shifted by one token; row 0 is the chunk's entering state.
    first = (o_row == 0)[:, None]
    b_pr, b_pi, _ = _decays(g, reset, b_cos, b_sin, i_b, o_t - 1, o_d, m_d, T, D, COMPLEX, HAS_RESET, False)
    b_qr, b_qi = _load_values(x, i_b, o_t - 1, o_d, m_d, T, D, COMPLEX)
    b_er, b_ei = _load_pair(entering, offs_chunk, m_d, COMPLEX)
    b_pr = tl.where(first, 0., b_pr)
    b_pi = tl.where(first, 0., b_pi)
    b_qr = tl.where(first, b_er[None, :], b_qr)
    b_qi = tl.where(first, b_ei[None, :], b_qi)
    b_pr, b_pi, b_hr, b_hi = _scan(b_pr, b_pi, b_qr, b_qi, COMPLEX, False)

    # u = a_t h_{t-1}; w = conj(dh_t) u: dg = Re w, dθ = -Σ Im w.
    b_ar, b_ai, _ = _decays(g, reset, b_cos, b_sin, i_b, o_t, o_d, m_d, T, D, COMPLEX, HAS_RESET, False)
    b_ur = b_ar * b_hr - b_ai * b_hi
    b_ui = b_ar * b_hi + b_ai * b_hr
    b_wr = b_sr * b_ur + b_si * b_ui
    mask = (o_t < T)[:, None] & m_d[None, :]
    offs = (i_b * T + o_t[:, None]) * D + o_d[None, :]
    _store_pair(dx, offs, b_sr, b_si, mask, COMPLEX)
    tl.store(dg + offs, b_wr.to(dg.dtype.element_ty), mask=mask)
    if COMPLEX:
        b_wi = b_sr * b_ui - b_si * b_ur
        tl.store(dtheta_part + offs_chunk, -tl.sum(tl.where(mask, b_wi, 0.), axis=0), mask=m_d)
