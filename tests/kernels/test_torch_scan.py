"""The vectorised torch path against the float64 reference: values, gradients, gradcheck, long sequences."""
import functools

import pytest

from hgrn_megatron.kernels import hgrn_scan
from hgrn_megatron.kernels.torch_scan import default_chunk_size, torch_scan
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
def test_torch_matches_reference(case):
    inputs = make_inputs(case)
    scan = functools.partial(hgrn_scan, backend="torch", output_final_state=bool(case.final),
                             chunk_size=case.chunk_size)
    out = run(scan, case, inputs)
    assert out["h"].dtype == case.dtype
    assert out["dx"].dtype == case.dtype and out["dg"].dtype == case.gate_dtype
    if case.final:
        assert out["h_last"].dtype == case.last_dtype
    if case.initial:
        assert out["dh0"].dtype == (case.initial_dtype or case.dtype)
    assert_close_to_reference(out, reference(case, inputs), TOLERANCE[case.dtype])


@pytest.mark.parametrize("variant", ["real", "complex"])
def test_torch_gradcheck_float64(variant):
    """Finite differences in float64 through the chunked path (T=11, chunks of 2: carries and a tail)."""
    assert gradcheck_scan(functools.partial(torch_scan, chunk_size=2), complex_mode=variant == "complex")


def test_default_chunk_size_is_about_sqrt_t():
    assert [default_chunk_size(T) for T in (1, 64, 4096, 65536, 10**7)] == [16, 16, 64, 128, 128]


@pytest.mark.parametrize("variant", ["real", "complex"])
def test_torch_long_sequence_is_stable(variant):
    check_long_sequence("torch", complex_mode=variant == "complex")
