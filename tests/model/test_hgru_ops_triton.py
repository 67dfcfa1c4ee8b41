"""The HGRU's Triton elementwise kernels (the CUDA path of `hgru_ops`) against its torch Functions, run on CPU by
Triton's interpreter (TRITON_INTERPRET=1, set in conftest), at sizes with ragged channel and feature blocks;
and lowered to sm_90 cubins through Triton's own compiler, which needs no GPU."""
import os
import subprocess
import sys

import pytest
import torch

from hgrn_megatron import hgru_ops

pytestmark = [pytest.mark.triton_interpret, pytest.mark.usefixtures("nan_filled_empty")]

if os.environ.get("TRITON_INTERPRET") != "1":  # conftest sets it before triton is imported
    pytest.skip("Triton's interpreter is not enabled (TRITON_INTERPRET=1)", allow_module_level=True)

from hgrn_megatron.hgru_ops_triton import GatedInputTriton, GatedNormTriton


def _compare(fused, reference, inputs, dtype):
    results = []
    for fn in (fused, reference):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in inputs]
        out = fn(*leaves)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.dtype)
        (out.float() * weights.float()).sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves if t is not None])
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for got, want in zip(*results):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert (got.double() - want.double()).norm() <= tol * want.double().norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pairs", [1, 2], ids=["real", "complex"])
def test_gated_input_kernels_match_the_torch_function(pairs, dtype):
    g = torch.Generator().manual_seed(0)
    B, S, C = 2, 3, 37  # 37 channels: a ragged block
    inputs = [(3 * torch.randn(B, S, pairs * C, generator=g)).to(dtype), torch.rand(B, S, C, generator=g)]
    _compare(GatedInputTriton.apply, hgru_ops._GatedInput.apply, inputs, dtype)


@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.bfloat16, torch.bfloat16)],
                         ids=["fp32", "bf16-fp32_weights", "bf16-bf16_weights"])  # bf16 training casts weights
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_gated_norm_kernels_match_the_torch_function(norm, dtype, weight_dtype):
    g = torch.Generator().manual_seed(1)
    B, S, F = 2, 5, 46  # 46 features in a block of 64; 10 rows over the interpreter's 8 programs
    h = (2 + 3 * torch.randn(B, S, F, generator=g)).to(dtype)
    gate = (3 * torch.randn(B, S, F, generator=g)).to(dtype)
    weight = (1 + torch.randn(F, generator=g)).to(weight_dtype)
    bias = torch.randn(F, generator=g).to(weight_dtype) if norm == "layernorm" else None
    inputs = [h, gate, weight, bias]

    def reference(h, gate, w, b):
        return hgru_ops._GatedNorm.apply(h, gate, w, b, 1e-5, None, F)

    _compare(lambda h, gate, w, b: GatedNormTriton.apply(h, gate, w, b, 1e-5), reference, inputs, dtype)


def test_cpu_tensors_use_the_torch_functions():
    assert hgru_ops._triton_functions(torch.zeros(1)) is None


LOWER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hgrn_megatron import hgru_ops_triton as k

target, count = GPUTarget("cuda", 90, 32), 0
for dt in ("bf16", "fp16", "fp32"):
    for pairs in (1, 2):
        for fn, sig in ((k._gated_input_fwd, dict(i_ptr=f"*{dt}", oml_ptr="*fp32", x_ptr=f"*{dt}")),
                        (k._gated_input_bwd, dict(i_ptr=f"*{dt}", oml_ptr="*fp32", dx_ptr=f"*{dt}", di_ptr=f"*{dt}",
                                                  doml_ptr="*fp32"))):
            signature = {**sig, "n_rows": "i32", "C": "i32", "PAIRS": "constexpr", "BLOCK_C": "constexpr"}
            triton.compile(ASTSource(fn, signature=signature, constexprs={"PAIRS": pairs, "BLOCK_C": 1024}),
                           target=target)
            count += 1
    # weights: fp32 (fp32 training, or master weights) or the activations' dtype (DeepSpeed's bf16/fp16 modules)
    for bias, wt in ((b, w) for b in (True, False) for w in sorted({"fp32", dt})):
        common = {"w_ptr": f"*{wt}", "b_ptr": f"*{wt}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "F": "i32",
                  "HAS_BIAS": "constexpr", "BLOCK_F": "constexpr"}
        constexprs = {"HAS_BIAS": bias, "BLOCK_F": 4096}
        triton.compile(ASTSource(k._gated_norm_fwd, signature={"h_ptr": f"*{dt}", "gate_ptr": f"*{dt}",
                       "out_ptr": f"*{dt}", "eps": "fp32", **common}, constexprs=constexprs),
                       target=target, options={"num_warps": 16})
        triton.compile(ASTSource(k._gated_norm_bwd, signature={"h_ptr": f"*{dt}", "gate_ptr": f"*{dt}",
                       "dout_ptr": f"*{dt}", "dh_ptr": f"*{dt}", "dgate_ptr": f"*{dt}", "dw_part_ptr": "*fp32",
                       "db_part_ptr": "*fp32", "n_rows": "i32", "rows_per_program": "i32", **common},
                       constexprs=constexprs), target=target, options={"num_warps": 16})
        count += 2
print(f"lowered {count} kernels")
"""


def test_kernels_lower_to_sm90_cubin():
    """Outside the interpreter: Triton's compiler and ptxas lower every variant (bf16/fp16/fp32 activations,
    fp32 or same-dtype weights, real/complex, LayerNorm/RMSNorm) at the feature width of hgrn-1b (2·2048)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", LOWER], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lowered 32 kernels" in result.stdout
