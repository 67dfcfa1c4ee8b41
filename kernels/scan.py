"""`hgrn_scan`: the public entry point, its input checks and backend dispatch."""
from __future__ import annotations

import os
import warnings

import torch

from .cpu_scan import cpu_scan, cpu_scan_available, cpu_scan_library
from .naive import hgrn_scan_reference
from .torch_scan import torch_scan

BACKENDS = ("auto", "reference", "cpu", "torch", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def hgrn_scan(
    x: torch.Tensor,
    g: torch.Tensor,
    *,
    theta: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reset: torch.Tensor | None = None,
    backend: str = "auto",
    check_values: bool | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The HGRN linear recurrence h_t = exp(g_t) · [e^{iθ}] · h_{t-1} + x_t, over the time axis.

    Args:
        x: `[B, T, D]` (real variant) or `[B, T, D, 2]` (complex variant: last axis = real, imaginary),
            fp16 / bf16 / fp32 / fp64.
        g: `[B, T, D]` log forget gate, `g <= 0` (`-inf` allowed: a zero decay).
        theta: `[D]` per-channel phase; selects the complex variant.
        initial_state: the state before the first token, `[B, D]` or `[B, D, 2]` (zero if None).
        output_final_state: also return the state after the last token.
        reset: bool `[B, T]`, True at the first token of each packed document: the state is cleared
            before that token's update (h_t = x_t), so documents never see each other.
        backend: "reference" (float64 loop, the ground truth), "cpu" (fused compiled kernel, CPU tensors),
            "torch" (vectorised torch ops, any device), "triton" (chunked kernels; CUDA, or CPU under
            TRITON_INTERPRET=1), "auto" (triton on CUDA, cpu on CPU when its kernel builds, else torch).
        check_values: verify `g <= 0` and not NaN (one pass over g). None (default): check CPU tensors,
            skip on accelerators, where reading the answer back would stall the launch queue.
        chunk_size: tokens per chunk for the torch / triton backends, a positive int (a power of two for
            triton); None: their default. The cpu backend has no chunks.

    Returns:
        `(h, h_last)`: h has x's shape and dtype; the state is accumulated in fp32, or in fp64 for fp64 x
        (not available on triton, whose kernels accumulate in fp32: "auto" takes the torch path for fp64
        on CUDA). h_last is the final state in that accumulation dtype (`[B, D]` or `[B, D, 2]`) or None.
        Differentiable with respect to x, g, theta and initial_state, including through h_last.

    Example:
        >>> x, g = torch.randn(2, 16, 8), torch.nn.functional.logsigmoid(torch.randn(2, 16, 8))
        >>> h, h_last = hgrn_scan(x, g, output_final_state=True, backend="torch")
    """
    _check_inputs(x, g, theta, initial_state, reset)
    if check_values is None:
        check_values = g.device.type == "cpu"
    # max() propagates NaN, so one reduction (no mask tensor) catches both positive and NaN gates.
    if check_values and not bool(g.max() <= 0):
        bad = g[~(g <= 0)]
        raise ValueError(f"hgrn_scan: g is the log forget gate and must be <= 0 (and not NaN); found "
                         f"{bad.numel()} bad values, e.g. {bad[:3].tolist()}")
    backend = _resolve_backend(backend, x)
    _check_chunk_size(chunk_size)

    if backend == "reference":
        h, h_last = hgrn_scan_reference(x, g, theta=theta, initial_state=initial_state, reset=reset)
        state_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return h.to(x.dtype), (h_last.to(state_dtype) if output_final_state else None)
    if backend == "cpu":
        return cpu_scan(x, g, theta=theta, initial_state=initial_state, output_final_state=output_final_state,
                        reset=reset)
    if backend == "torch":
        return torch_scan(x, g, theta=theta, initial_state=initial_state, output_final_state=output_final_state,
                          reset=reset, chunk_size=chunk_size)
    from .triton_scan import triton_scan

    return triton_scan(x, g, theta=theta, initial_state=initial_state, output_final_state=output_final_state,
                       reset=reset, chunk_size=chunk_size)


def _shape(t: torch.Tensor) -> str:
    return f"[{', '.join(str(s) for s in t.shape)}] {str(t.dtype).replace('torch.', '')}"


def _check_inputs(x, g, theta, initial_state, reset) -> None:
    """Raise ValueError naming the argument, its shape/dtype, and what was expected."""
    for name, t in (("x", x), ("g", g)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"hgrn_scan: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"hgrn_scan: {name} must be fp16/bf16/fp32/fp64, got {_shape(t)}")
    if g.dim() != 3:
        raise ValueError(f"hgrn_scan: g must be [B, T, D], got {_shape(g)}")
    B, T, D = g.shape
    if B == 0 or T == 0 or D == 0:
        raise ValueError(f"hgrn_scan: empty input, g is {_shape(g)} (B, T and D must be >= 1)")
    complex_mode = theta is not None
    expected_x = (B, T, D, 2) if complex_mode else (B, T, D)
    if tuple(x.shape) != expected_x:
        hint = ""
        if not complex_mode and x.dim() == 4 and x.shape[-1] == 2:
            hint = " (a [..., 2] complex input needs theta)"
        elif complex_mode and x.dim() == 3:
            hint = " (theta was given, so x must carry (real, imaginary) pairs on a last axis of 2)"
        raise ValueError(f"hgrn_scan: x must be [{', '.join(map(str, expected_x))}] to match g {_shape(g)}, "
                         f"got {_shape(x)}{hint}")
    tensors = {"x": x, "g": g}
    if complex_mode:
        if not isinstance(theta, torch.Tensor) or theta.shape != (D,) or theta.dtype not in _FLOAT_DTYPES:
            got = _shape(theta) if isinstance(theta, torch.Tensor) else type(theta).__name__
            raise ValueError(f"hgrn_scan: theta must be a floating [D] = [{D}] tensor, got {got}")
        tensors["theta"] = theta
    if initial_state is not None:
        expected = (B, D, 2) if complex_mode else (B, D)
        if (not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != expected
                or initial_state.dtype not in _FLOAT_DTYPES):
            got = _shape(initial_state) if isinstance(initial_state, torch.Tensor) else type(initial_state).__name__
            raise ValueError(f"hgrn_scan: initial_state must be a floating [{', '.join(map(str, expected))}] "
                             f"tensor, got {got}")
        tensors["initial_state"] = initial_state
    if reset is not None:
        if not isinstance(reset, torch.Tensor) or reset.dtype != torch.bool or tuple(reset.shape) != (B, T):
            got = _shape(reset) if isinstance(reset, torch.Tensor) else type(reset).__name__
            raise ValueError(f"hgrn_scan: reset must be a bool [B, T] = [{B}, {T}] tensor, got {got}")
        tensors["reset"] = reset
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"hgrn_scan: all inputs must be on one device, got {devices}")


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"hgrn_scan: chunk_size must be a positive int (or None for the backend's default), "
                         f"got {chunk_size!r}")  # triton's power-of-two rule is checked where it configures


_warned_auto_fallback = False


def _auto_backend(device_type: str, dtype: torch.dtype) -> str:
    """What "auto" runs for x on `device_type` with `dtype`."""
    global _warned_auto_fallback
    if device_type == "cpu":
        return "cpu" if cpu_scan_available() else "torch"
    if device_type != "cuda" or dtype == torch.float64:  # triton accumulates in fp32
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        if not _warned_auto_fallback:
            warnings.warn("hgrn_scan: triton is not importable; backend='auto' uses the torch path on CUDA")
            _warned_auto_fallback = True
        return "torch"
    return "triton"


def _resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"hgrn_scan: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return _auto_backend(x.device.type, x.dtype)
    if backend == "cpu":
        if x.device.type != "cpu":
            raise RuntimeError(f"hgrn_scan: backend='cpu' needs CPU tensors (got device {x.device}); use 'auto'")
        cpu_scan_library()  # raises RuntimeError with the compiler's message if the kernel cannot be built
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as err:
            raise RuntimeError("hgrn_scan: backend='triton' but triton is not importable") from err
        if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"hgrn_scan: backend='triton' needs CUDA tensors (got device {x.device}); on CPU "
                               "set TRITON_INTERPRET=1 before triton is imported, or use backend='torch'")
        if x.dtype == torch.float64:
            raise ValueError("hgrn_scan: backend='triton' accumulates in fp32, so it takes fp16/bf16/fp32 x "
                             "(got float64); use backend='torch' or 'auto' for a float64 scan")
    return backend
