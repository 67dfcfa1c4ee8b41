"""Triton kernels for `hgru_ops` on GPU: the gated input and the gated norm, each one pass forward and one back.

In torch ops each step of these chains is a pass over a token-sized tensor (the gated norm's backward is about
a dozen); here every kernel reads its inputs once and writes its outputs once, in fp32 registers. Same
contract, same saved tensors and same math as the torch Functions in `hgru_ops.py`, which they are tested
against (tests/model/test_hgru_ops_triton.py, under TRITON_INTERPRET=1). The gated norm kernel needs every
feature of a token on this rank (TP = 1); `hgru_ops.gated_norm` uses the torch Function otherwise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gated_input_fwd(i_ptr, oml_ptr, x_ptr, n_rows, C, PAIRS: tl.constexpr, BLOCK_C: tl.constexpr):
    """x[r, c·P + p] = silu(i[r, c·P + p]) · (1 − λ)[r, c]; one program per (row, channel block)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    oml = tl.load(oml_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    for p in tl.static_range(PAIRS):
        offs = row * C * PAIRS + cols * PAIRS + p
        i = tl.load(i_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = i * tl.sigmoid(i) * oml
        tl.store(x_ptr + offs, x.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_input_bwd(i_ptr, oml_ptr, dx_ptr, di_ptr, doml_ptr, n_rows, C, PAIRS: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    """di = dx · (1 − λ) · silu'(i); d(1 − λ)[r, c] = Σ_p dx · silu(i)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    oml = tl.load(oml_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    doml = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p in tl.static_range(PAIRS):
        offs = row * C * PAIRS + cols * PAIRS + p
        i = tl.load(i_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dx = tl.load(dx_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(i)
        di = dx * oml * sig * (1.0 + i * (1.0 - sig))
        tl.store(di_ptr + offs, di.to(di_ptr.dtype.element_ty), mask=mask)
        doml += dx * i * sig
    tl.store(doml_ptr + row * C + cols, doml, mask=mask)


@triton.jit
def _gated_norm_fwd(h_ptr, gate_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr, F, eps,
                    HAS_BIAS: tl.constexpr, BLOCK_F: tl.constexpr):
    """out = Norm(h)·silu(gate) for one token (row); LayerNorm with a bias, RMSNorm without."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_F)
    mask = cols < F
    h = tl.load(h_ptr + row * F + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        mean = tl.sum(h, axis=0) / F
        h = tl.where(mask, h - mean, 0.0)
        tl.store(mean_ptr + row, mean)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / F + eps)
    tl.store(rstd_ptr + row, rstd)
    y = h * rstd * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + row * F + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * F + cols, (y * g * tl.sigmoid(g)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_norm_bwd(h_ptr, gate_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, dout_ptr, dh_ptr, dgate_ptr,
                    dw_part_ptr, db_part_ptr, n_rows, F, rows_per_program,
                    HAS_BIAS: tl.constexpr, BLOCK_F: tl.constexpr):
    """dh and d_gate row by row; this program's share of d_weight and d_bias summed over its rows."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_F)
    mask = cols < F
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.zeros([BLOCK_F], dtype=tl.float32)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_F], dtype=tl.float32)
    db = tl.zeros([BLOCK_F], dtype=tl.float32)
    first = pid * rows_per_program
    for k in range(rows_per_program):
        row = (first + k).to(tl.int64)
        if row < n_rows:
            h = tl.load(h_ptr + row * F + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                h = tl.where(mask, h - tl.load(mean_ptr + row), 0.0)
            rstd = tl.load(rstd_ptr + row)
            x_hat = h * rstd
            y = x_hat * w + b
            g = tl.load(gate_ptr + row * F + cols, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(g)
            dout = tl.load(dout_ptr + row * F + cols, mask=mask, other=0.0).to(tl.float32)
            dgate = dout * y * sig * (1.0 + g * (1.0 - sig))
            tl.store(dgate_ptr + row * F + cols, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
            dy = dout * g * sig
            dw += dy * x_hat
            db += dy
            dx_hat = dy * w
            dh = dx_hat - x_hat * (tl.sum(dx_hat * x_hat, axis=0) / F)
            if HAS_BIAS:
                dh -= tl.sum(dx_hat, axis=0) / F
            tl.store(dh_ptr + row * F + cols, (dh * rstd).to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + pid * F + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(db_part_ptr + pid * F + cols, db, mask=mask)


def _channel_grid(n_rows: int, C: int) -> tuple[tuple[int, int], int]:
    block = min(1024, triton.next_power_of_2(C))
    return (n_rows, triton.cdiv(C, block)), block


class GatedInputTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, one_minus_lambda):
        C = one_minus_lambda.shape[-1]
        pairs = inputs.shape[-1] // C
        i, oml = inputs.contiguous(), one_minus_lambda.contiguous()
        x = torch.empty_like(i)
        grid, block = _channel_grid(oml.numel() // C, C)
        _gated_input_fwd[grid](i, oml, x, grid[0], C, PAIRS=pairs, BLOCK_C=block)
        ctx.save_for_backward(i, oml)
        return x

    @staticmethod
    def backward(ctx, dx):
        i, oml = ctx.saved_tensors
        C = oml.shape[-1]
        di, doml = torch.empty_like(i), torch.empty_like(oml, dtype=torch.float32)
        grid, block = _channel_grid(oml.numel() // C, C)
        _gated_input_bwd[grid](i, oml, dx.contiguous(), di, doml, grid[0], C, PAIRS=i.shape[-1] // C,
                               BLOCK_C=block)
        return di, doml.to(oml.dtype)


class GatedNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, gate, weight, bias, eps):
        F_ = h.shape[-1]
        h2, gate2 = h.contiguous(), gate.contiguous()
        n_rows = h2.numel() // F_
        out = torch.empty_like(h2)
        mean = torch.empty(n_rows, dtype=torch.float32, device=h.device) if bias is not None else None
        rstd = torch.empty(n_rows, dtype=torch.float32, device=h.device)
        block = triton.next_power_of_2(F_)
        _gated_norm_fwd[(n_rows,)](h2, gate2, weight, bias if bias is not None else weight, out,
                                   mean if mean is not None else rstd, rstd, F_, eps,
                                   HAS_BIAS=bias is not None, BLOCK_F=block, num_warps=min(16, max(1, block // 256)))
        ctx.save_for_backward(h2, gate2, weight, bias, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, dout):
        h, gate, weight, bias, mean, rstd = ctx.saved_tensors
        F_ = h.shape[-1]
        n_rows = h.numel() // F_
        dh, dgate = torch.empty_like(h), torch.empty_like(gate)
        programs = max(1, min(n_rows, 4 * _sm_count(h.device)))
        rows_per_program = triton.cdiv(n_rows, programs)
        dw_part = torch.empty(programs, F_, dtype=torch.float32, device=h.device)
        db_part = torch.empty(programs, F_, dtype=torch.float32, device=h.device) if bias is not None else dw_part
        block = triton.next_power_of_2(F_)
        _gated_norm_bwd[(programs,)](h, gate, weight, bias if bias is not None else weight,
                                     mean if mean is not None else rstd, rstd, dout.contiguous(), dh, dgate,
                                     dw_part, db_part, n_rows, F_, rows_per_program,
                                     HAS_BIAS=bias is not None, BLOCK_F=block,
                                     num_warps=min(16, max(1, block // 256)))
        d_weight = dw_part.sum(0).to(weight.dtype)
        d_bias = db_part.sum(0).to(bias.dtype) if bias is not None else None
        return dh, dgate, d_weight, d_bias, None


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter (tests): a few programs, each over several rows
