"""The fused CPU path of `hgrn_scan`: `cpu_scan.cpp`, built on first use, called through ctypes.

Why a compiled kernel on CPU: the scan is memory-bound, and the best a sequence of torch ops can do is several
passes over [B, T, D] tensors (decays, chunk sums, two local scans). The fused kernel reads x and g once and
writes h once in the forward, and reads dout, g and h once and writes dx and dg once in the backward
(benchmarks/scan_cpu.py compares it with the torch path and the reference loop). Its large outputs are advised
for huge pages, since faulting them in 4 KiB pages cost more than the kernel itself (`_empty_output`).

The library is compiled by `torch.utils.cpp_extension.load` (ninja; a lock file makes concurrent ranks wait for
one build) into $TORCH_EXTENSIONS_DIR, under a name that includes a fingerprint of this CPU, because it is
built with -march=native. Where no compiler is available, `cpu_scan_available()` is False and `hgrn_scan`'s
"auto" backend uses the torch path instead.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import platform
import sys
import warnings
from pathlib import Path

import torch
from torch.profiler import record_function

SOURCE = Path(__file__).with_name("cpu_scan.cpp")
_POINTER = ctypes.c_void_p
_INT = ctypes.c_int64


def _cpu_fingerprint() -> str:
    """Machine, CPU model and feature flags: a library built with -march=native only runs where these match."""
    parts = [platform.machine(), platform.processor()]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part"):
                parts.append(line)
                if len(parts) > 4:
                    break
    except OSError:
        pass
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:10]


def cpu_scan_library() -> ctypes.CDLL:
    """The kernel library, built (or found in the extensions cache) and loaded on the first call; raises
    RuntimeError saying why when it cannot be built."""
    lib = _build_library()
    if isinstance(lib, str):
        raise RuntimeError(lib)
    return lib


@functools.cache
def _build_library() -> ctypes.CDLL | str:
    """The loaded library, or the reason it could not be built: a failure is remembered too, so that a
    machine without a compiler tries once, not at every scan."""
    from torch.utils import cpp_extension

    name = f"hgrn_cpu_scan_{_cpu_fingerprint()}"
    errors = []
    # -fno-trapping-math lets the compiler evaluate both sides of the kernels' float selects, which it needs to
    # vectorise a loop that mixes float and double (FP traps are never enabled in torch processes).
    for arch_flags in (["-march=native"], []):  # some compilers/architectures reject -march=native
        try:
            path = cpp_extension.load(name=name if arch_flags else name + "_generic", sources=[str(SOURCE)],
                                      extra_cflags=["-O3", "-fno-trapping-math", "-fopenmp", *arch_flags],
                                      extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
            break
        except Exception as err:  # noqa: BLE001 - any build failure falls through to the next flag set
            detail = [line for line in str(err).splitlines() if line.strip()][-2:]  # the compiler's verdict
            errors.append(f"{' '.join(arch_flags) or 'generic'}: {' / '.join(detail)}")
    else:
        return "hgrn_scan: could not build the fused CPU kernel (" + "; ".join(errors) + ")"
    lib = ctypes.CDLL(path)
    for suffix in ("f32", "f64"):
        forward = getattr(lib, f"hgrn_cpu_scan_forward_{suffix}")
        forward.argtypes = [_POINTER] * 7 + [_INT] * 3 + [ctypes.c_int]
        forward.restype = None
        backward = getattr(lib, f"hgrn_cpu_scan_backward_{suffix}")
        backward.argtypes = [_POINTER] * 12 + [_INT] * 3 + [ctypes.c_int]
        backward.restype = None
    return lib


_warned_unavailable = False


def cpu_scan_available() -> bool:
    """True if the fused kernel is built (building it on the first call); warns once when it cannot be."""
    global _warned_unavailable
    try:
        cpu_scan_library()
        return True
    except RuntimeError as err:
        if not _warned_unavailable:
            warnings.warn(f"{err}; backend='auto' uses the slower torch path on CPU")
            _warned_unavailable = True
        return False


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14

# Whether kernel outputs of >= 4 MiB are advised for transparent huge pages (see `_empty_output`); a switch for
# benchmarks/scan_cpu.py's comparison, and for a machine where THP faults turn out slower.
advise_huge_pages = True


@functools.cache
def _madvise():
    """libc's madvise on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def _empty_output(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous tensor like `like`, for a kernel output.

    Large outputs are fresh memory mappings (glibc maps blocks over 32 MiB anew each time), and faulting them
    in 4 KiB pages cost more than the kernel's own pass: forward + backward at B=4, T=4096, D=512 took 35 ms
    (real) and 61 ms (complex) in repeated calls, against 17 and 27 ms with 2 MiB pages
    (docs/BENCHMARKS.md). So the 2 MiB-aligned interior of an output of >= 4 MiB is advised for transparent
    huge pages; the kernel writes every byte of it anyway. Where THP is off, nothing changes."""
    out = torch.empty_like(like, memory_format=torch.contiguous_format)
    nbytes = out.numel() * out.element_size()
    madvise = _madvise() if advise_huge_pages and nbytes >= 2 * _HUGE_PAGE else None
    if madvise is not None:
        start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (out.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if end > start:
            madvise(start, end - start, _MADV_HUGEPAGE)  # advice: a failure only means 4 KiB pages
    return out


class CpuScanFunction(torch.autograd.Function):
    """Autograd wrapper around the fused kernels; inputs already checked by `hgrn_scan` (complex x: [B, T, D, 2])."""

    @staticmethod
    def forward(ctx, x, g, theta, initial_state, reset, output_final_state):
        ctx.set_materialize_grads(False)  # an unused h or h_last arrives as None: no zero tensor is read
        lib = cpu_scan_library()
        B, T, D = g.shape
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # the accumulation dtype
        suffix = "f64" if dtype == torch.float64 else "f32"
        xs = x.to(dtype).contiguous()
        gs = g.to(dtype).contiguous()
        h0 = initial_state.to(dtype).contiguous() if initial_state is not None else None
        reset_u8 = reset.contiguous().view(torch.uint8) if reset is not None else None
        cos_theta = sin_theta = None
        if theta is not None:
            phase = theta.detach().double()  # the kernel rotates in double (see cpu_scan.cpp)
            cos_theta, sin_theta = torch.cos(phase), torch.sin(phase)
        h = _empty_output(xs)
        with record_function("hgrn_scan::cpu_forward"):  # the profiler sees no aten op inside a ctypes call
            getattr(lib, f"hgrn_cpu_scan_forward_{suffix}")(
                _ptr(xs), _ptr(gs), _ptr(cos_theta), _ptr(sin_theta), _ptr(reset_u8), _ptr(h0), _ptr(h),
                B, T, D, torch.get_num_threads())

        h_last = h[:, -1].clone() if output_final_state else None  # in the accumulation dtype, as h
        # h in the accumulation dtype is saved (it *is* the output for fp32 x): dg needs h_{t-1} unrounded.
        ctx.save_for_backward(gs, cos_theta, sin_theta, h0, reset_u8, h)
        ctx.x_dtype, ctx.g_dtype = x.dtype, g.dtype
        ctx.theta_dtype = theta.dtype if theta is not None else None
        ctx.initial_dtype = initial_state.dtype if initial_state is not None else None
        return (h if h.dtype == x.dtype else h.to(x.dtype)), h_last

    @staticmethod
    def backward(ctx, dout, dlast):
        gs, cos_theta, sin_theta, h0, reset_u8, h = ctx.saved_tensors
        B, T, D = gs.shape
        dtype = h.dtype
        dout = dout.to(dtype).contiguous() if dout is not None else torch.zeros_like(h)
        dlast = dlast.to(dtype).contiguous() if dlast is not None else None
        dx = _empty_output(h)
        dg = _empty_output(gs)
        dh0 = torch.empty_like(h0) if h0 is not None else None
        dtheta_rows = torch.empty(B, D, dtype=torch.float64) if cos_theta is not None else None
        with record_function("hgrn_scan::cpu_backward"):
            getattr(cpu_scan_library(), f"hgrn_cpu_scan_backward_{'f64' if dtype == torch.float64 else 'f32'}")(
                _ptr(gs), _ptr(cos_theta), _ptr(sin_theta), _ptr(reset_u8), _ptr(h), _ptr(h0), _ptr(dout),
                _ptr(dlast), _ptr(dx), _ptr(dg), _ptr(dh0), _ptr(dtheta_rows), B, T, D, torch.get_num_threads())
        dtheta = dtheta_rows.sum(0).to(ctx.theta_dtype) if dtheta_rows is not None else None
        if dh0 is not None:
            dh0 = dh0.to(ctx.initial_dtype)
        return dx.to(ctx.x_dtype), dg.to(ctx.g_dtype), dtheta, dh0, None, None


def cpu_scan(x, g, *, theta=None, initial_state=None, output_final_state=False, reset=None):
    """Fused CPU path of `hgrn_scan` (same contract; inputs are assumed checked and on the CPU)."""
    return CpuScanFunction.apply(x, g, theta, initial_state, reset, output_final_state)
