"""Lower the Triton scan kernels to cubins for one GPU architecture, without a GPU (`scan_gpu.py --compile-only`).

Each kernel is compiled at the configuration `triton_scan` launches it with for D = 2048, T = 4096: block
sizes from `_config` and `_carry_config`, warps from the launcher (4, and `_grads_warps` for the grads
kernel), so the register counts reported are those of the kernels that would run. Variants:
  core  complex, resets, bf16 x with fp32 gates (the HGRU's mix in bf16 training), with and without the
        initial/final-state paths
  all   real and complex x (bf16 x with bf16 or fp32 gates, fp32 x) x with/without resets x with/without
        the state paths
`--registers` adds each cubin's registers, stack, local (spilled) and shared bytes (cuobjdump
--dump-resource-usage).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

D, T = 2048, 4096
STATE_FLAGS = ("HAS_INITIAL", "STORE_FINAL", "HAS_FINAL_GRAD")
X_POINTERS = ("x", "do", "out", "dx")  # x's dtype; g and dg take the gate dtype; summaries, states, θ: fp32


def variants(which: str) -> list[dict]:
    if which == "core":
        return [dict(complex=True, reset=True, x="bf16", g="fp32", states=s) for s in (False, True)]
    return [dict(complex=c, reset=r, x=x, g=g, states=s) for c in (False, True) for r in (False, True)
            for x, g in (("bf16", "bf16"), ("bf16", "fp32"), ("fp32", "fp32")) for s in (False, True)]


def _resource_usage(cubin: bytes, cuobjdump: Path) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = {}
    for key, field in (("registers", "REG"), ("stack_bytes", "STACK"), ("local_bytes", "LOCAL"),
                       ("shared_bytes", "SHARED")):
        found = re.search(rf"\b{field}:(\d+)", text)
        usage[key] = int(found.group(1)) if found else None
    return usage


def compile_only(sm: int, which: str = "all", registers: bool = False) -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET"):
        raise RuntimeError("--compile-only needs triton imported without TRITON_INTERPRET")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hgrn_megatron.kernels import triton_kernels as kernels
    from hgrn_megatron.kernels.triton_scan import _carry_config, _config, _grads_warps

    BT, BD = _config(D, None, None)
    BDC, NTB = _carry_config(D, triton.cdiv(T, BT))
    launch = {  # kernel: (constexpr values, warps), as triton_scan launches it with num_warps=4
        kernels.chunk_hgrn_fwd_kernel_summary: (dict(BT=BT, BD=BD), 4),
        kernels.chunk_hgrn_fwd_kernel_carry: (dict(BT=BT, BD=BDC, NTB=NTB), 4),
        kernels.chunk_hgrn_fwd_kernel_output: (dict(BT=BT, BD=BD), 4),
        kernels.chunk_hgrn_fwd_kernel_single_pass: (dict(BT=BT, BD=BD), 4),
        kernels.chunk_hgrn_bwd_kernel_summary: (dict(BT=BT, BD=BD), 4),
        kernels.chunk_hgrn_bwd_kernel_carry: (dict(BT=BT, BD=BDC, NTB=NTB), 4),
        kernels.chunk_hgrn_bwd_kernel_grads: (dict(BT=BT, BD=BD), _grads_warps(BT, BD, 4)),
    }
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    target = GPUTarget("cuda", sm, 32)
    seen, started = set(), time.perf_counter()
    for v in variants(which):
        for fn, (sizes, warps) in launch.items():
            constants = dict(D=D, COMPLEX=v["complex"], HAS_RESET=v["reset"], **sizes,
                             **{flag: v["states"] for flag in STATE_FLAGS})
            signature, constexprs = {}, {}
            for name in fn.arg_names:  # types from the naming convention: UPPER = constexpr, T/NT = sizes
                if name in constants:
                    signature[name], constexprs[name] = "constexpr", constants[name]
                elif name in ("T", "NT"):
                    signature[name] = "i32"
                elif (name in ("theta", "dtheta_part") and not v["complex"]) or (name == "reset" and not v["reset"]):
                    signature[name], constexprs[name] = "constexpr", None
                elif name == "reset":
                    signature[name] = "*u8"
                elif name in X_POINTERS:
                    signature[name] = f"*{v['x']}"
                elif name in ("g", "dg"):
                    signature[name] = f"*{v['g']}"
                else:
                    signature[name] = "*fp32"
            key = (fn.__name__, tuple(sorted(signature.items())), tuple(sorted(constexprs.items())), warps)
            if key in seen:  # a kernel without the pointers or flags that differ between two variants
                continue
            seen.add(key)
            compiled = triton.compile(ASTSource(fn, signature=signature, constexprs=constexprs), target=target,
                                      options={"num_warps": warps})
            cubin = compiled.asm.get("cubin")
            assert cubin, f"{fn.__name__}: no cubin"
            if registers:
                usage = _resource_usage(cubin, cuobjdump)
                print(f"{fn.__name__:36s} {'complex' if v['complex'] else 'real':7s} x={v['x']} g={v['g']} "
                      f"reset={int(v['reset'])} states={int(v['states'])} warps={warps} BD={sizes['BD']}: "
                      f"registers {usage['registers']}, stack {usage['stack_bytes']} B, "
                      f"local {usage['local_bytes']} B, shared {usage['shared_bytes']} B", flush=True)
    print(f"compiled {len(seen)} kernel variants to sm_{sm} cubin in {time.perf_counter() - started:.1f}s "
          f"(BT={BT}, BD={BD}, carry BD={BDC} NTB={NTB}, grads warps={_grads_warps(BT, BD, 4)})")
    return 0
