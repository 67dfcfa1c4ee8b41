"""The fused CPU kernel against the float64 reference: values, gradients, gradcheck, long sequences, threading,
its exp, and the fallback when no compiler can build it."""
import functools
import math
import warnings

import pytest
import torch

from hgrn_megatron.kernels import cpu_scan as cpu_scan_module
from hgrn_megatron.kernels import hgrn_scan
from hgrn_megatron.kernels.cpu_scan import cpu_scan
from hgrn_megatron.kernels.scan import _resolve_backend
from tests.kernels.scan_cases import (
    CPU_CASES,
    TOLERANCE,
    assert_close_to_reference,
    check_long_sequence,
    gradcheck_scan,
    make_inputs,
    reference,
    run,
)


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def test_cpu_matches_reference(case):
    inputs = make_inputs(case)
    scan = functools.partial(hgrn_scan, backend="cpu", output_final_state=bool(case.final))
    out = run(scan, case, inputs)
    assert out["h"].dtype == case.dtype
    assert out["dx"].dtype == case.dtype and out["dg"].dtype == case.gate_dtype
    if case.final:
        assert out["h_last"].dtype == case.last_dtype
    if case.initial:
        assert out["dh0"].dtype == (case.initial_dtype or case.dtype)
    assert_close_to_reference(out, reference(case, inputs), TOLERANCE[case.dtype])


@pytest.mark.parametrize("variant", ["real", "complex"])
def test_cpu_gradcheck_float64(variant):
    assert gradcheck_scan(cpu_scan, complex_mode=variant == "complex")


@pytest.mark.parametrize("variant", ["real", "complex"])
def test_cpu_long_sequence_is_stable(variant):
    check_long_sequence("cpu", complex_mode=variant == "complex")


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("B", [1, 3])
def test_cpu_results_do_not_depend_on_threads(B, restore_threads):
    """Work items (batch row x channel block) never share data, so 1 and 4 threads give identical bits; with
    4 threads D = 200 is cut into ragged blocks (67 + 67 + 66) that must join up exactly."""
    case = dict(B=B, T=45, D=200)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(B, 45, 200, 2, generator=gen)
    g = torch.nn.functional.logsigmoid(2 + torch.randn(B, 45, 200, generator=gen))
    theta = torch.randn(200, generator=gen)
    h0 = torch.randn(B, 200, 2, generator=gen)
    reset = torch.rand(B, 45, generator=gen) < 0.1

    def outputs(threads):
        torch.set_num_threads(threads)
        leaves = [t.clone().requires_grad_() for t in (x, g, theta, h0)]
        h, last = cpu_scan(leaves[0], leaves[1], theta=leaves[2], initial_state=leaves[3], reset=reset,
                           output_final_state=True)
        (h * torch.cos(torch.arange(h.numel()).view(h.shape))).sum().add(last.sum()).backward()
        return [h, last] + [t.grad for t in leaves]

    one, four = outputs(1), outputs(4)
    for name, a, b in zip(["h", "h_last", "dx", "dg", "dtheta", "dh0"], one, four):
        if name == "dtheta":  # a sum over batch rows: the only value whose summation order may follow blocks
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), (case, name)
        else:
            assert torch.equal(a, b), (case, name)


@pytest.mark.parametrize("B,D,threads", [(1, 8192, 56), (1, 5248, 38), (2, 6144, 83), (1, 130, 3)])
def test_cpu_channel_blocks_cover_d_exactly_at_any_thread_count(B, D, threads, restore_threads):
    """Many threads on a wide D: the channel width is rounded up, so fewer blocks than aimed for can cover D
    (8192 aimed at 112 blocks: width 74, 111 blocks). Every block must start inside D; the results equal
    those of one thread, complex with an initial state and resets, so every kernel's split is exercised."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(B, 3, D, 2, generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn(B, 3, D, generator=gen))
    theta, h0 = torch.randn(D, generator=gen), torch.randn(B, D, 2, generator=gen)
    reset = torch.tensor([[False, True, False]] * B)

    def outputs(threads, complex_mode):
        torch.set_num_threads(threads)
        leaves = [t.clone().requires_grad_() for t in (x if complex_mode else x[..., 0], g, theta,
                                                      h0 if complex_mode else h0[..., 0])]
        h, last = cpu_scan(leaves[0], leaves[1], theta=leaves[2] if complex_mode else None,
                           initial_state=leaves[3], reset=reset, output_final_state=True)
        (h * h.detach().cos()).sum().add(last.sum()).backward()
        return [h, last, leaves[0].grad, leaves[1].grad, leaves[3].grad]

    for complex_mode in (False, True):
        for a, b in zip(outputs(1, complex_mode), outputs(threads, complex_mode)):
            assert torch.equal(a, b)


def test_cpu_decay_is_exp_to_float_precision():
    """The kernel's own exp (a vectorisable polynomial): one step from h0 = 1 with x = 0 gives h = exp(g).
    Covers the whole fp32 range down to the clamp (-87), below it (exactly 0) and g = -inf (exactly 0)."""
    g = torch.cat([-torch.logspace(-8, math.log10(87.0), 4001), torch.tensor([-87.5, -100.0, -float("inf")])])
    D = g.numel()
    h, _ = hgrn_scan(torch.zeros(1, 1, D), g.view(1, 1, D), initial_state=torch.ones(1, D), backend="cpu")
    want = torch.exp(g.double())
    inside = g >= -87.0
    rel = ((h.view(-1)[inside].double() - want[inside]) / want[inside]).abs()
    assert rel.max() <= 3 * 2 ** -24, rel.max()  # within a few ulp of float32
    assert torch.equal(h.view(-1)[~inside], torch.zeros(int((~inside).sum())))


def test_auto_uses_the_cpu_kernel_on_cpu():
    x = torch.randn(2, 4, 3)
    assert _resolve_backend("auto", x) == "cpu"
    with pytest.raises(RuntimeError, match=r"backend='cpu' needs CPU tensors \(got device meta\)"):
        _resolve_backend("cpu", x.to("meta"))


def test_without_a_compiler_auto_falls_back_to_torch(monkeypatch, tmp_path):
    """A real failed build (CXX points to no compiler, in an empty extensions directory): 'auto' warns once and
    uses the torch path; an explicit backend='cpu' raises with the compiler error."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.setattr(cpu_scan_module, "_warned_unavailable", False)
    cpu_scan_module._build_library.cache_clear()
    try:
        x = torch.randn(1, 5, 3)
        with pytest.warns(UserWarning, match=r"(?s)could not build the fused CPU kernel.*uses the slower torch path"):
            assert _resolve_backend("auto", x) == "torch"
        with pytest.raises(RuntimeError, match="could not build the fused CPU kernel"):
            hgrn_scan(x, torch.zeros(1, 5, 3), backend="cpu")
        # The failure is remembered: later calls neither rebuild nor warn again.
        monkeypatch.setenv("CXX", "c++")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _resolve_backend("auto", x) == "torch"
        assert cpu_scan_module._build_library.cache_info().misses == 1
    finally:
        cpu_scan_module._build_library.cache_clear()


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that contains `address` (from /proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            start, end = (int(part, 16) for part in fields[0].split("-"))
            inside = start <= address < end
        elif inside and fields[0] == "VmFlags:":
            return fields[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _thp_mode() -> str | None:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


@pytest.mark.skipif(_thp_mode() in (None, "never"), reason="needs Linux with transparent huge pages")
def test_large_outputs_are_advised_for_huge_pages(monkeypatch):
    """h, dx and dg of >= 4 MiB get MADV_HUGEPAGE on their 2 MiB-aligned interior (VmFlags 'hg'), results stay
    those of the reference."""
    outputs = []

    def recording(like):
        outputs.append(cpu_scan_module._empty_output.__wrapped__(like))
        return outputs[-1]

    recording.__wrapped__ = cpu_scan_module._empty_output
    monkeypatch.setattr(cpu_scan_module, "_empty_output", recording)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 1024, 2048, generator=gen).requires_grad_()  # 8 MiB
    g = torch.nn.functional.logsigmoid(2 + torch.randn(1, 1024, 2048, generator=gen)).requires_grad_()
    weight = torch.randn(x.shape, generator=gen)
    h, _ = cpu_scan(x, g)
    (h * weight).sum().backward()
    assert len(outputs) == 3  # h, dx, dg
    for out in outputs:
        interior = -(-out.data_ptr() // (2 << 20)) * (2 << 20)
        assert "hg" in _vm_flags(interior), _vm_flags(interior)

    xr, gr = x.detach().clone().requires_grad_(), g.detach().clone().requires_grad_()
    href, _ = hgrn_scan(xr, gr, backend="reference")
    (href * weight).sum().backward()
    for got, want in ((h, href), (x.grad, xr.grad), (g.grad, gr.grad)):
        assert ((got.double() - want.double()).norm() / want.double().norm()) <= 1e-5

    # Control: with the advice off, an output of 40 MiB (above glibc's largest mmap threshold, so a mapping
    # no earlier advice can have touched) has no 'hg' flag.
    monkeypatch.setattr(cpu_scan_module, "advise_huge_pages", False)
    out = recording(torch.empty(10 << 20))
    assert "hg" not in _vm_flags(-(-out.data_ptr() // (2 << 20)) * (2 << 20))
