"""The Triton path of `hgrn_scan`: launches the kernels of `triton_kernels.py` and wires them into autograd.

Forward: summary -> carry -> output, or one single-pass kernel when there are enough channel blocks to fill
the device (`_single_pass_forward`); either saves only the inputs and the per-chunk entering states
([B, T/BT, D], fp32). Backward: summary -> carry -> grads, recomputing what it needs from those.
"""
from __future__ import annotations

import torch
import triton

from .triton_kernels import (
    chunk_hgrn_bwd_kernel_carry,
    chunk_hgrn_bwd_kernel_grads,
    chunk_hgrn_bwd_kernel_summary,
    chunk_hgrn_fwd_kernel_carry,
    chunk_hgrn_fwd_kernel_output,
    chunk_hgrn_fwd_kernel_single_pass,
    chunk_hgrn_fwd_kernel_summary,
)


def _config(D: int, chunk_size: int | None, block_d: int | None) -> tuple[int, int]:
    """(BT, BD). Defaults keep a [BT, BD] tile at 16 fp32 values per thread at 4 warps: the backward's
    grads kernel holds several such tiles, and larger ones spill registers on sm_90 (checked with
    `benchmarks/scan_gpu.py --compile-only 90 --registers`, docs/BENCHMARKS.md)."""
    BT = 64 if chunk_size is None else chunk_size
    BD = min(32, triton.next_power_of_2(D)) if block_d is None else block_d
    for name, value in (("chunk_size", BT), ("block_d", BD)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"hgrn_scan: backend 'triton' needs {name} to be a power of two, got {value}")
    return BT, BD


def _grads_warps(BT: int, BD: int, num_warps: int) -> int:
    """The grads kernel keeps ~4 live [BT, BD] tiles: give it enough warps for <= 8 values per thread."""
    return min(16, max(num_warps, BT * BD // 256))


def _carry_config(D: int, NT: int) -> tuple[int, int]:
    """Channel block and chunks per step of the carry kernels: a [NTB, BD] tile of 5 fp32 operands (complex)
    stays within registers at 4 warps."""
    return min(32, triton.next_power_of_2(D)), min(64, max(2, triton.next_power_of_2(NT)))


class TritonScanFunction(torch.autograd.Function):
    """Autograd wrapper around the chunked kernels; inputs already checked by `hgrn_scan`."""

    @staticmethod
    def forward(ctx, x, g, theta, initial_state, reset, output_final_state, chunk_size, block_d, num_warps,
                forward):
        ctx.set_materialize_grads(False)  # an unused h or h_last arrives as None: no zero tensor is read
        complex_mode = theta is not None
        B, T, D = g.shape
        BT, BD = _config(D, chunk_size, block_d)
        NT, ND = triton.cdiv(T, BT), triton.cdiv(D, BD)
        C = 2 if complex_mode else 1
        x, g = x.contiguous(), g.contiguous()
        theta = theta.contiguous() if theta is not None else None
        reset_u8 = reset.contiguous().view(torch.uint8) if reset is not None else None
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        flags = dict(COMPLEX=complex_mode, HAS_RESET=reset is not None, num_warps=num_warps)

        entering = x.new_empty(B, NT, D, C, dtype=torch.float32)
        h_last = x.new_empty(B, D, C, dtype=torch.float32) if output_final_state else None
        out = torch.empty_like(x)
        if _single_pass_forward(forward, B * ND, NT, x.device):
            chunk_hgrn_fwd_kernel_single_pass[(ND, B)](
                x, g, theta, reset_u8, h0, entering, out, h_last, T, NT, D, BT, BD, HAS_INITIAL=h0 is not None,
                STORE_FINAL=output_final_state, **flags)
        else:
            chunk_lg = x.new_empty(B, NT, D, dtype=torch.float32)
            chunk_h = torch.empty_like(entering)
            chunk_hgrn_fwd_kernel_summary[(NT, ND, B)](x, g, theta, reset_u8, chunk_lg, chunk_h, T, D, BT, BD,
                                                       **flags)
            BDC, NTB = _carry_config(D, NT)
            chunk_hgrn_fwd_kernel_carry[(triton.cdiv(D, BDC), B)](
                chunk_lg, chunk_h, theta, h0, entering, h_last, T, NT, D, BT, BDC, NTB, COMPLEX=complex_mode,
                HAS_INITIAL=h0 is not None, STORE_FINAL=output_final_state, num_warps=4)
            chunk_hgrn_fwd_kernel_output[(NT, ND, B)](x, g, theta, reset_u8, entering, out, T, D, BT, BD,
                                                      **flags)

        ctx.save_for_backward(x, g, theta, reset_u8, entering)
        ctx.config = (BT, BD, num_warps)
        ctx.initial_dtype = initial_state.dtype if initial_state is not None else None
        if h_last is not None:
            h_last = h_last.view(B, D, 2) if complex_mode else h_last.view(B, D)
        return out, h_last

    @staticmethod
    def backward(ctx, dout, dlast):
        x, g, theta, reset_u8, entering = ctx.saved_tensors
        BT, BD, num_warps = ctx.config
        complex_mode = theta is not None
        B, T, D = g.shape
        NT, ND = triton.cdiv(T, BT), triton.cdiv(D, BD)
        flags = dict(COMPLEX=complex_mode, HAS_RESET=reset_u8 is not None, num_warps=num_warps)
        dout = dout.contiguous() if dout is not None else torch.zeros_like(x)
        dlast = dlast.float().contiguous() if dlast is not None else None

        chunk_lg = x.new_empty(B, NT, D, dtype=torch.float32)
        chunk_s = torch.empty_like(entering)
        chunk_hgrn_bwd_kernel_summary[(NT, ND, B)](dout, g, theta, reset_u8, chunk_lg, chunk_s, T, D, BT, BD,
                                                   **flags)
        arriving = torch.empty_like(entering)
        has_initial = ctx.initial_dtype is not None
        dh0 = x.new_empty(B, D, entering.shape[-1], dtype=torch.float32) if has_initial else None
        BDC, NTB = _carry_config(D, NT)
        chunk_hgrn_bwd_kernel_carry[(triton.cdiv(D, BDC), B)](
            chunk_lg, chunk_s, dlast, g, theta, reset_u8, arriving, dh0, T, NT, D, BT, BDC, NTB,
            COMPLEX=complex_mode, HAS_RESET=reset_u8 is not None, HAS_FINAL_GRAD=dlast is not None,
            HAS_INITIAL=has_initial, num_warps=4)
        dx = torch.empty_like(x)
        dg = torch.empty_like(g)
        dtheta_part = x.new_empty(B, NT, D, dtype=torch.float32) if complex_mode else None
        flags["num_warps"] = _grads_warps(BT, BD, num_warps)
        chunk_hgrn_bwd_kernel_grads[(NT, ND, B)](x, dout, g, theta, reset_u8, entering, arriving, dx, dg,
                                                 dtheta_part, T, D, BT, BD, **flags)
        dtheta = dtheta_part.sum(dim=(0, 1)).to(theta.dtype) if complex_mode else None
        if dh0 is not None:
            dh0 = (dh0 if complex_mode else dh0.view(B, D)).to(ctx.initial_dtype)
        return dx, dg, dtheta, dh0, None, None, None, None, None, None


def _single_pass_forward(forward: str, programs: int, chunks: int, device: torch.device) -> bool:
    """The single-pass forward has B·ND programs, each walking its chunks in order; the three-kernel forward
    has B·ND·NT in its parallel kernels but reads x and g twice. "auto": single pass once there are a few
    programs per SM and more than one chunk to walk (a heuristic still to be tuned on a GPU:
    benchmarks/scan_gpu.py times both)."""
    if forward not in ("auto", "single_pass", "three_kernels"):
        raise ValueError(f"triton scan: forward must be 'auto', 'single_pass' or 'three_kernels', got {forward!r}")
    if forward != "auto":
        return forward == "single_pass"
    if device.type != "cuda":
        return False
    return chunks > 1 and programs >= 2 * torch.cuda.get_device_properties(device).multi_processor_count


def triton_scan(x, g, *, theta=None, initial_state=None, output_final_state=False, reset=None,
                chunk_size=None, block_d=None, num_warps=4, forward="auto"):
    """Chunked Triton path of `hgrn_scan` (same contract; inputs are assumed checked). `forward`: "auto",
    "single_pass" or "three_kernels" (the backward is the same for both)."""
    return TritonScanFunction.apply(x, g, theta, initial_state, reset, output_final_state, chunk_size, block_d,
                                    num_warps, forward)
