"""The public entry point: input checks (messages name the argument and what was expected) and dispatch."""
import pytest
import torch

from hgrn_megatron.kernels import BACKENDS, hgrn_scan, hgrn_scan_reference
from hgrn_megatron.kernels.scan import _auto_backend, _resolve_backend


def _inputs(B=2, T=5, D=3, complex_mode=False):
    x = torch.randn((B, T, D, 2) if complex_mode else (B, T, D))
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, D))
    return x, g


@pytest.mark.parametrize("kwargs, x_shape, message", [
    ({}, (2, 5, 4), r"x must be \[2, 5, 3\] to match g \[2, 5, 3\] float32, got \[2, 5, 4\]"),
    ({}, (2, 5, 3, 2), r"needs theta"),
    ({"theta": torch.zeros(3)}, (2, 5, 3), r"x must be \[2, 5, 3, 2\].*theta was given"),
    ({"theta": torch.zeros(4)}, (2, 5, 3, 2), r"theta must be a floating \[D\] = \[3\] tensor, got \[4\]"),
    ({"initial_state": torch.zeros(2, 4)}, (2, 5, 3), r"initial_state must be a floating \[2, 3\] tensor"),
    ({"theta": torch.zeros(3), "initial_state": torch.zeros(2, 3)}, (2, 5, 3, 2), r"initial_state .*\[2, 3, 2\]"),
    ({"reset": torch.zeros(2, 5)}, (2, 5, 3), r"reset must be a bool \[B, T\] = \[2, 5\] tensor, got \[2, 5\] float32"),
    ({"reset": torch.zeros(2, 4, dtype=torch.bool)}, (2, 5, 3), r"reset must be a bool"),
])
def test_bad_shapes_are_named(kwargs, x_shape, message):
    g = torch.nn.functional.logsigmoid(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match=message):
        hgrn_scan(torch.randn(x_shape), g, backend="torch", **kwargs)


def test_bad_dtypes_and_ranks_are_named():
    x, g = _inputs()
    with pytest.raises(ValueError, match=r"x must be fp16/bf16/fp32/fp64, got \[2, 5, 3\] int64"):
        hgrn_scan(x.long(), g)
    with pytest.raises(ValueError, match=r"g must be \[B, T, D\], got \[10, 3\]"):
        hgrn_scan(x, g.reshape(10, 3))
    with pytest.raises(ValueError, match=r"empty input"):
        hgrn_scan(x[:, :0], g[:, :0])
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor"):
        hgrn_scan(x.tolist(), g)


def test_gate_values_are_checked_on_cpu():
    x, g = _inputs()
    bad = g.clone()
    bad[0, 1, 2] = 0.5
    with pytest.raises(ValueError, match=r"must be <= 0 .* found 1 bad values, e.g. \[0.5\]"):
        hgrn_scan(x, bad)
    # check_values=False skips the check: the positive gate is used as given (a growing state).
    h, _ = hgrn_scan(x, bad, check_values=False, backend="torch")
    torch.testing.assert_close(h, hgrn_scan_reference(x, bad)[0].float())
    bad[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"must be <= 0 \(and not NaN\)"):
        hgrn_scan(x, bad)
    # -inf is a legitimate gate (decay exactly zero).
    g_inf = g.clone()
    g_inf[:, 2] = float("-inf")
    h, _ = hgrn_scan(x, g_inf, backend="torch")
    torch.testing.assert_close(h[:, 2], x[:, 2])


def test_inputs_must_share_a_device():
    x, g = _inputs()
    with pytest.raises(ValueError, match=r"one device.*'x': device\(type='meta'\)"):
        hgrn_scan(x.to("meta"), g)


def test_backend_names_and_resolution(monkeypatch):
    x, g = _inputs()
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'reference', 'cpu', 'torch', 'triton'\)"):
        hgrn_scan(x, g, backend="cuda")
    assert _resolve_backend("auto", x) == "cpu"  # CPU tensors (the fused kernel builds here)
    # Import triton while the interpreter is still selected: triton reads the variable when first imported.
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"backend='triton' needs CUDA tensors \(got device cpu\)"):
        _resolve_backend("triton", x)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("variant", ["real", "complex"])
def test_output_contract(backend, dtype, variant):
    """h: x's shape and dtype; h_last: the accumulation dtype (fp32, fp64 for fp64 x) or None; every backend
    but the reference itself gives the reference's numbers."""
    complex_mode = variant == "complex"
    x, g = _inputs(complex_mode=complex_mode)
    theta = torch.randn(3) if complex_mode else None
    h0 = torch.randn((2, 3, 2) if complex_mode else (2, 3))
    x, g = x.to(dtype), g.to(dtype)
    h, h_last = hgrn_scan(x, g, theta=theta, initial_state=h0, output_final_state=True, backend=backend)
    assert h.shape == x.shape and h.dtype == dtype
    assert h_last.shape == h0.shape
    assert h_last.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert hgrn_scan(x, g, theta=theta, backend=backend)[1] is None
    if backend != "reference":
        ref, ref_last = hgrn_scan_reference(x, g, theta=theta, initial_state=h0)
        tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-12}[dtype]
        assert (h.double() - ref).norm() <= tol * ref.norm()
        assert (h_last.double() - ref_last).norm() <= (1e-12 if dtype == torch.float64 else 1e-5) * ref_last.norm()


def test_chunk_size_is_checked():
    x, g = _inputs()
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=rf"chunk_size must be a positive int .*got {bad!r}"):
            hgrn_scan(x, g, backend="torch", chunk_size=bad)
    hgrn_scan(x, g, backend="torch", chunk_size=3)  # any positive size on the torch path


@pytest.mark.triton_interpret
def test_triton_needs_power_of_two_chunks_and_at_most_fp32():
    pytest.importorskip("triton")
    x, g = _inputs()
    with pytest.raises(ValueError, match=r"backend 'triton' needs chunk_size to be a power of two, got 48"):
        hgrn_scan(x, g, backend="triton", chunk_size=48)
    with pytest.raises(ValueError, match=r"backend='triton' accumulates in fp32.*got float64"):
        hgrn_scan(x.double(), g.double(), backend="triton")


def test_auto_takes_the_torch_path_for_float64_on_cuda():
    """Decided from device type and dtype, so it is tested without a GPU."""
    assert _auto_backend("cuda", torch.float64) == "torch"
    assert _auto_backend("cpu", torch.float64) == "cpu"
    assert _auto_backend("mps", torch.float32) == "torch"
    pytest.importorskip("triton")
    assert _auto_backend("cuda", torch.float32) == "triton" and _auto_backend("cuda", torch.bfloat16) == "triton"


@pytest.mark.parametrize("backend", ["cpu", "torch", pytest.param("triton", marks=pytest.mark.triton_interpret)])
def test_non_contiguous_inputs(backend):
    """Sequence-first activations transposed to batch-first views, and a strided θ, as a caller may pass them."""
    T, B, D = 37, 2, 5
    x_sbd = torch.randn(T, B, D, 2)
    g_sbd = torch.nn.functional.logsigmoid(torch.randn(T, B, D))
    theta = torch.randn(2 * D)[::2]
    reset = torch.rand(B, T) < 0.1
    x, g = x_sbd.transpose(0, 1), g_sbd.transpose(0, 1)
    assert not x.is_contiguous() and not g.is_contiguous() and not theta.is_contiguous()
    h, h_last = hgrn_scan(x, g, theta=theta, reset=reset, output_final_state=True, backend=backend, chunk_size=8)
    ref, ref_last = hgrn_scan_reference(x, g, theta=theta, reset=reset)
    assert (h.double() - ref).norm() <= 1e-5 * ref.norm()
    assert (h_last.double() - ref_last).norm() <= 1e-5 * ref_last.norm()


def test_empty_is_nan_filled_in_kernel_tests():
    """The kernels/ conftest's guard is on: an output a kernel leaves unwritten would read as NaN."""
    assert torch.empty(3).isnan().all() and torch.empty_like(torch.ones(2, dtype=torch.complex64)).isnan().all()
    assert torch.ones(2).new_empty(4).isnan().all()
    assert torch.empty(2, dtype=torch.int64).dtype == torch.int64  # integers are left alone
