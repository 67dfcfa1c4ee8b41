"""The chunked Triton kernels, run on CPU by Triton's interpreter (TRITON_INTERPRET=1, set in conftest).

The interpreter executes every program in Python, so sizes are small but chosen to cross chunk (BT) and
channel-block (BD) boundaries with ragged remainders. A separate test lowers the kernels to sm_90 cubins
through Triton's ptxas, which catches GPU compilation errors without a GPU.
"""
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hgrn_megatron.kernels import hgrn_scan, hgrn_scan_reference
from tests.kernels.scan_cases import TOLERANCE, Case, assert_close_to_reference, make_inputs, reference, run

pytestmark = pytest.mark.triton_interpret
REPO = Path(__file__).resolve().parents[2]

if os.environ.get("TRITON_INTERPRET") != "1":  # conftest sets it before triton is imported
    pytest.skip("Triton's interpreter is not enabled (TRITON_INTERPRET=1)", allow_module_level=True)

from hgrn_megatron.kernels.triton_scan import triton_scan

# chunk_size 16 / block_d 8 unless stated: T=40 -> chunks 16+16+8, D=20 -> blocks 8+8+4, D=12 -> 8+4.
CASES = [
    Case(2, 40, 20, initial=True, final="also"),
    Case(2, 40, 12, complex=True, initial=True, final="also"),
    Case(2, 40, 20, reset="edges", final="also"),
    Case(2, 40, 12, complex=True, initial=True, reset="edges"),
    Case(2, 33, 7, complex=True, initial=True, reset="random", final="only"),
    Case(2, 16, 8, initial=True, reset="all", final="also"),
    Case(1, 1, 5, complex=True, initial=True, final="also"),
    Case(1, 1, 1, initial=True, final="also"),
    Case(2, 40, 20, initial=True, final="also", reset="random", dtype=torch.bfloat16),
    Case(2, 40, 12, complex=True, initial=True, final="also", dtype=torch.bfloat16),
    Case(2, 40, 12, complex=True, initial=True, final="also", reset="random", dtype=torch.bfloat16,
         g_dtype=torch.float32, initial_dtype=torch.float16),  # bf16 training's mix
    Case(1, 70, 20, initial=True, final="also", reset="random", chunk_size=64),  # default blocks: 64, 32
    # 70 chunks of 2 tokens: the carry kernels scan them in two blocks of 64 (complex: the slow test below).
    Case(1, 140, 3, initial=True, final="also", reset="edges", chunk_size=2),
]


def _scan(case, forward="three_kernels"):
    block = {} if case.chunk_size else {"chunk_size": 16, "block_d": 8}
    return functools.partial(triton_scan, output_final_state=bool(case.final), forward=forward,
                             chunk_size=case.chunk_size or block["chunk_size"], block_d=block.get("block_d"))


@pytest.mark.parametrize("forward", ["three_kernels", "single_pass"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_triton_matches_reference(case, forward):
    inputs = make_inputs(case)
    out = run(_scan(case, forward), case, inputs)
    assert out["h"].dtype == case.dtype and out["dx"].dtype == case.dtype and out["dg"].dtype == case.gate_dtype
    if case.final:
        assert out["h_last"].dtype == torch.float32
    if case.initial:
        assert out["dh0"].dtype == (case.initial_dtype or case.dtype)
    assert_close_to_reference(out, reference(case, inputs), TOLERANCE[case.dtype])


def test_triton_through_public_entry_point_equals_torch_path():
    case = Case(2, 70, 5, complex=True, initial=True, final="also", reset="random")
    inputs = make_inputs(case)
    tri = run(functools.partial(hgrn_scan, backend="triton", output_final_state=True), case, inputs)
    tor = run(functools.partial(hgrn_scan, backend="torch", output_final_state=True), case, inputs)
    assert_close_to_reference(tri, tor, 1e-5)


def _long_inputs(T, D, complex_mode, seed=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((1, T, D, 2) if complex_mode else (1, T, D), generator=gen)
    near_one = -10 ** (-6 + 2 * torch.rand(1, T, D // 2, generator=gen))
    near_zero = -80 * torch.rand(1, T, D - D // 2, generator=gen)
    g = torch.cat([near_one, near_zero], dim=-1)
    theta = torch.linspace(-3, 3, D) if complex_mode else None
    return x, g, theta


def _check_long(T, complex_mode, chunk_size, forward="three_kernels"):
    """Finite, and the float64 loop's values at sampled positions, with decays near 1 and near 0."""
    x, g, theta = _long_inputs(T, 4, complex_mode)
    h, h_last = triton_scan(x, g, theta=theta, output_final_state=True, chunk_size=chunk_size, block_d=4,
                            forward=forward)
    assert torch.isfinite(h).all() and torch.isfinite(h_last).all()
    with torch.no_grad():
        ref, ref_last = hgrn_scan_reference(x, g, theta=theta)
    positions = torch.cat([torch.arange(0, T, 61), torch.tensor([T - 1])])
    tol = TOLERANCE[torch.float32]
    assert (h[:, positions].double() - ref[:, positions]).norm() <= tol * ref[:, positions].norm()
    assert (h_last.double() - ref_last).norm() <= tol * ref_last.norm()


@pytest.mark.slow
@pytest.mark.parametrize("forward", ["three_kernels", "single_pass"])
@pytest.mark.parametrize("variant", ["real", "complex"])
def test_triton_long_sequence_is_stable(variant, forward):
    _check_long(4096, variant == "complex", chunk_size=16, forward=forward)  # 256 chunks: four carry blocks


@pytest.mark.heavy
@pytest.mark.parametrize("forward", ["three_kernels", "single_pass"])
@pytest.mark.parametrize("variant", ["real", "complex"])
def test_triton_65536_tokens_is_stable(variant, forward):
    _check_long(65536, variant == "complex", chunk_size=64, forward=forward)


def _lower_to_sm90(variants):
    """Compile (no GPU needed) through benchmarks/scan_gpu.py --compile-only, outside the interpreter."""
    ptxas = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists() and shutil.which("ptxas") is None:
        pytest.skip("no ptxas available to lower the kernels")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scan_gpu.py"), "--compile-only", "90",
                             "--variants", variants], env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_triton_kernels_lower_to_sm90_cubin():
    """At the launch configuration: complex, resets, bf16 x with fp32 gates (bf16 training), with and without
    the state paths: every code path but the real combine."""
    out = _lower_to_sm90("core")
    assert "compiled 10 kernel variants to sm_90 cubin" in out
    assert "(BT=64, BD=32, carry BD=32 NTB=64, grads warps=8)" in out


@pytest.mark.heavy
def test_triton_all_kernel_variants_lower_to_sm90_cubin():
    assert "compiled 92 kernel variants to sm_90 cubin" in _lower_to_sm90("all")


@pytest.mark.slow
def test_gpu_benchmark_dry_run(tmp_path):
    """benchmarks/scan_gpu.py end to end at toy sizes on CPU (kernels interpreted): every code path but the
    CUDA timers and fla, so the one-call GPU run does not fail on a Python error."""
    out = tmp_path / "scan_gpu.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scan_gpu.py"), "--dry-run", "--quick",
                             "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert all(check["pass"] for check in report["correctness"].values()), report["correctness"]
    rows = report["shapes"][0]["rows"]
    assert any(r["name"].startswith("ours") and "fwdbwd_ms" in r for r in rows), rows
    assert not [r for r in rows if "error" in r], rows
