"""Where one training step's time goes: torch.profiler over forward, backward and optimizer step.

Used by `train_throughput.py --profile MIXER:T` (CPU) and `gpu_train_step.py --profile` (GPU). Reports
1. the wall time of each phase (forward; backward, including DeepSpeed's gradient reduction hooks; step);
2. the top operators by self time;
3. self time by the function that issued the operator (the innermost frame in this project, megatron-core,
   DeepSpeed, torch.optim or torch.nn.functional, shown with the function's first line; the profiler mostly
   attributes backward operators to the forward call that created them, and the project's own autograd
   Functions are recognised by their backward node), and by component, which is what tells the model's own
   arithmetic from overhead.
"""
from __future__ import annotations

import collections
import re
import time
from pathlib import Path

# Operators that are the model's dense arithmetic (matmuls and fused attention kernels).
MATMUL_OPS = re.compile(r"^aten::(mm|addmm|bmm|baddbmm|matmul|linear|_scaled_dot_product\w*|_flash_attention\w*|"
                        r"_efficient_attention\w*)$")
# Frames worth naming, innermost first; everything else (torch internals, module __call__) is skipped.
_REPO = re.escape(str(Path(__file__).resolve().parents[1]) + "/")  # this checkout, wherever it lives
INTERESTING = re.compile(rf"({_REPO}|hgrn_megatron|/kernels/|/pretrain/|/benchmarks/|megatron/core/|deepspeed/|"
                         r"torch/optim/|torch/nn/functional\.py)")
SHORTEN = re.compile(rf"^.*?(site-packages/|{_REPO})")
ENGINE_BACKWARD = re.compile(r"deepspeed/runtime/engine\.py\(\d+\): backward$")


AUTOGRAD = "(autograd engine: backward ops with no forward frame)"


def _location(event) -> str:
    for frame in event.stack or ():
        if ENGINE_BACKWARD.search(frame):  # issued by autograd inside `engine.backward(loss)`, not by DeepSpeed
            return AUTOGRAD
        if INTERESTING.search(frame) and not frame.startswith("nn.Module"):
            return SHORTEN.sub("", frame)
    return AUTOGRAD


def _backward_node(event) -> str | None:
    """The autograd node whose backward issued `event` (None for forward and optimizer operators)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("autograd::engine::evaluate_function: "):
            return parent.name.split(": ", 1)[1]
        parent = parent.cpu_parent
    return None


# Backward nodes of the project's own autograd Functions, which the forward frame does not always name.
OWN_NODES = {"CpuScanFunctionBackward": "kernels/cpu_scan.py", "TorchScanFunctionBackward": "kernels/torch_scan.py",
             "TritonScanFunctionBackward": "kernels/triton_scan.py", "_ForgetGateBackward": "hgrn_megatron/hgru_ops.py",
             "_GatedInputBackward": "hgrn_megatron/hgru_ops.py", "_GatedNormBackward": "hgrn_megatron/hgru_ops.py"}


def component(op: str, location: str) -> str:
    """Coarse owner of an operator's time."""
    if MATMUL_OPS.match(op):
        return "matmuls and attention kernels (model arithmetic)"
    if location.startswith(AUTOGRAD[:-1]):
        return "autograd bookkeeping (broadcast-gradient sums, accumulation)"
    if location.startswith("deepspeed/"):
        return "DeepSpeed (gradient buckets, partition copies, norms)"
    if location.startswith("torch/optim/"):
        return "AdamW"
    if location.startswith("kernels/"):
        return "HGRN scan (kernels/)"
    if location.startswith("hgrn_megatron/"):
        return "HGRN mixer elementwise (gates, mixer norm, layout)"
    if location.startswith(("megatron/", "torch/nn/functional")):
        return "megatron-core elementwise (block norms, SwiGLU, residual, loss)"
    return "other"


def profile_training_step(engine, tokens, top: int = 25, cuda: bool = False) -> dict:
    """Profile one `train_step` (already warmed up); print the tables and return them as a dict."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from hgrn_megatron.pretrain.data import model_inputs

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    phases = {}
    with profile(activities=activities, with_stack=True, record_shapes=False,
                 experimental_config=torch._C._profiler._ExperimentalConfig(verbose=True)) as prof:
        sync()
        t0 = time.perf_counter()
        with record_function("forward"):
            x = model_inputs(tokens)
            loss = engine(x.input_ids, labels=x.labels).float().mean()
            sync()
        t1 = time.perf_counter()
        with record_function("backward"):
            engine.backward(loss)
            sync()
        t2 = time.perf_counter()
        with record_function("step"):
            engine.step()
            sync()
        t3 = time.perf_counter()
    phases = {"forward_s": t1 - t0, "backward_s": t2 - t1, "step_s": t3 - t2, "total_s": t3 - t0}
    print("phases (profiled, so slower than unprofiled): " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()))

    time_attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    by_op, by_line, by_component = collections.Counter(), collections.Counter(), collections.Counter()
    calls = collections.Counter()
    for event in prof.events():
        self_us = getattr(event, time_attr, 0)
        # hgrn_scan:: ranges wrap the fused CPU kernel, a ctypes call with no aten operator inside.
        if not event.name.startswith(("aten::", "hgrn_scan::")) or self_us <= 0:
            continue
        where, node = _location(event), _backward_node(event)
        if node in OWN_NODES:
            where = f"{OWN_NODES[node]} ({node})"
        elif node is not None and where == AUTOGRAD:
            where = f"{AUTOGRAD[:-1]}: {node})"
        by_op[event.name] += self_us
        by_line[(event.name, where)] += self_us
        calls[(event.name, where)] += 1
        by_component[component(event.name, where)] += self_us
    total = sum(by_op.values()) or 1.0

    def pct(us: float) -> str:
        return f"{100 * us / total:5.1f}%"

    print(f"\nself time of aten operators and scan kernels: {total / 1e3:.0f} ms\n\n| component | ms | share |\n|---|---|---|")
    for name, us in by_component.most_common():
        print(f"| {name} | {us / 1e3:.0f} | {pct(us)} |")
    print("\n| operator | ms | share |\n|---|---|---|")
    for name, us in by_op.most_common(top):
        print(f"| {name} | {us / 1e3:.0f} | {pct(us)} |")
    print("\n| operator | issued at | calls | ms | share |\n|---|---|---|---|---|")
    for (name, where), us in by_line.most_common(top):
        print(f"| {name} | {where} | {calls[(name, where)]} | {us / 1e3:.0f} | {pct(us)} |")
    return {
        "phases": phases,
        "aten_self_ms": total / 1e3,
        "components_ms": {k: v / 1e3 for k, v in by_component.most_common()},
        "top_ops_ms": {k: v / 1e3 for k, v in by_op.most_common(top)},
        "top_lines_ms": [{"op": n, "at": w, "calls": calls[(n, w)], "ms": v / 1e3} for (n, w), v in by_line.most_common(top)],
    }
