"""Context parallelism of the HGRN scan: a sequence split over CP ranks, passing only recurrent states, computes
what one rank computes over the whole sequence: outputs, final state and every gradient."""
import pytest
import torch
import torch.nn.functional as F

from hgrn_megatron import kernels
from hgrn_megatron.testing.distributed import run_distributed

pytestmark = pytest.mark.distributed

FP32_ROUNDING = 2e-5  # relative to each tensor's largest entry


def _inputs(complex_mode: bool, T: int, B: int = 2, D: int = 8, resets=(), seed: int = 0, dtype=torch.float32):
    """x, g, θ, h0, reset (resets in row 0 only: row 1 is one stream) and the loss weights of h and h_last."""
    gen = torch.Generator().manual_seed(seed)
    shape = (B, T, D, 2) if complex_mode else (B, T, D)
    x = torch.randn(shape, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, D, generator=gen) + 3.0)  # decays near 1: states carry far
    theta = torch.rand(D, generator=gen) if complex_mode else None
    h0 = torch.randn((B, D, 2) if complex_mode else (B, D), generator=gen)
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[0, list(resets)] = True
    w_h, w_last = torch.randn(shape, generator=gen), torch.randn(h0.shape, generator=gen)
    return x.to(dtype), g, theta, h0, reset, w_h.to(dtype), w_last


def _leaves(tensors):
    return [t.clone().requires_grad_(True) if t is not None else None for t in tensors]


def _single_rank(complex_mode, T, resets, backend, dtype=torch.float32):
    x, g, theta, h0, reset, w_h, w_last = _inputs(complex_mode, T, resets=resets, dtype=dtype)
    x, g, theta, h0 = _leaves((x, g, theta, h0))
    h, last = kernels.hgrn_scan(x, g, theta=theta, initial_state=h0, reset=reset, output_final_state=True,
                                backend=backend)
    ((h * w_h).sum() + (last * w_last).sum()).backward()
    return {"h": h.detach(), "last": last.detach(), "x": x.grad, "g": g.grad, "h0": h0.grad,
            "theta": theta.grad if theta is not None else None}


def _cp_rank(complex_mode, T, resets, backend, dtype=torch.float32):
    """This rank's piece: outputs, its outgoing state and its gradients (θ's is this piece's share)."""
    import torch.distributed as dist

    from hgrn_megatron.context_parallel import context_parallel_scan

    rank, world = dist.get_rank(), dist.get_world_size()
    x, g, theta, h0, reset, w_h, w_last = _inputs(complex_mode, T, resets=resets, dtype=dtype)
    piece = slice(rank * T // world, (rank + 1) * T // world)
    x, g, w_h, reset = x[:, piece], g[:, piece], w_h[:, piece], reset[:, piece]
    x, g, theta, h0 = _leaves((x, g, theta, h0))
    h, last = context_parallel_scan(x, g, theta=theta, initial_state=h0, reset=reset, group=dist.group.WORLD,
                                    backend=backend, output_final_state=True)
    loss = (h * w_h).sum()
    if rank == world - 1:
        loss = loss + (last * w_last).sum()  # the sequence's final state lives on the last rank
    loss.backward()
    return {"h": h.detach(), "last": last.detach(), "x": x.grad, "g": g.grad, "h0": h0.grad,
            "theta": theta.grad if theta is not None else None}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _check(world, complex_mode, T, resets, backend="auto", dtype=torch.float32, tolerance=FP32_ROUNDING):
    ref = _single_rank(complex_mode, T, resets, backend, dtype)
    ranks = run_distributed(_cp_rank, world_size=world, args=(complex_mode, T, resets, backend, dtype), timeout=120)
    for key in ("h", "x", "g"):
        assert _rel(torch.cat([r[key] for r in ranks], dim=1).float(), ref[key].float()) < tolerance, key
    assert _rel(ranks[-1]["last"], ref["last"]) < tolerance
    assert _rel(ranks[0]["h0"], ref["h0"]) < tolerance
    assert all(r["h0"] is None for r in ranks[1:])  # the initial state is the first piece's alone
    if complex_mode:
        assert _rel(sum(r["theta"] for r in ranks), ref["theta"]) < tolerance
    # The carry matters: a later piece scanned from zero would be far off (so the comparison can fail).
    x, g, theta, _, reset, _, _ = _inputs(complex_mode, T, resets=resets)
    later = slice(T // world, 2 * T // world)
    alone = kernels.hgrn_scan(x[:, later], g[:, later], theta=theta, reset=reset[:, later])[0]
    assert _rel(alone.float(), ref["h"][:, later].float()) > 10 * tolerance
    return ranks


@pytest.mark.parametrize("complex_mode", [True, False], ids=["complex", "real"])
def test_cp2_matches_one_rank_with_resets_inside_and_at_the_boundary(complex_mode):
    _check(2, complex_mode, T=64, resets=(0, 13, 32))  # 32: the first token of the second piece


@pytest.mark.parametrize("complex_mode", [True, False], ids=["complex", "real"])
def test_cp4_matches_one_rank(complex_mode):
    # piece 1 (16..31) has no reset, piece 2 starts with one, piece 3 has one inside.
    _check(4, complex_mode, T=64, resets=(5, 32, 50))


def test_cp2_bf16_inputs():
    """bf16 x (the state and the exchange stay fp32): equal up to bf16's rounding of the outputs."""
    _check(2, True, T=64, resets=(7,), dtype=torch.bfloat16, tolerance=1e-2)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton_interpret)])
def test_cp2_other_backends(backend):
    _check(2, True, T=64, resets=(20,), backend=backend)


def _exchanged_bytes(T):
    import torch.distributed as dist

    from hgrn_megatron.context_parallel import context_parallel_scan, exchange_counter

    x, g, theta, _, reset, _, _ = _inputs(True, T, B=2, D=16)
    rank, world = dist.get_rank(), dist.get_world_size()
    piece = slice(rank * T // world, (rank + 1) * T // world)
    x, g, theta = _leaves((x[:, piece], g[:, piece], theta))
    exchange_counter.reset()
    h, _ = context_parallel_scan(x, g, theta=theta, reset=reset[:, piece], group=dist.group.WORLD)
    h.sum().backward()
    return exchange_counter.calls, exchange_counter.bytes


def test_bytes_exchanged_do_not_grow_with_sequence_length():
    short = run_distributed(_exchanged_bytes, world_size=2, args=(1024,), timeout=120)
    long = run_distributed(_exchanged_bytes, world_size=2, args=(16384,), timeout=120)
    assert short == long
    # Forward: (A, S) of each rank; backward: one state per rank. B = 2, D = 16, complex (2 floats), fp32.
    state = 2 * 16 * 2 * 4
    assert short[0] == (2, 2 * 2 * state + 2 * state)


# ------------------------------------------------------------------------------------------ the model
VARIANTS = {
    "complex": dict(variant="complex", reset_at_document_boundary=True, add_bias_linear=True),
    "real": dict(variant="real", expand_ratio=2, mixer_norm="rmsnorm", output_gate=False,
                 share_embeddings_and_output_weights=True, reset_at_document_boundary=True),
}


def _compare_models(ref, ranks, tp):
    from hgrn_megatron.tp_rules import merge_state_dicts
    from tests.model.model_harness import max_rel_diff

    by_cp = {}
    for r in ranks:
        by_cp.setdefault(r["cp_rank"], []).append(r)
    pieces = [sorted(by_cp[c], key=lambda r: r["tp_rank"]) for c in sorted(by_cp)]
    logits = torch.cat([torch.cat([r["logits"] for r in piece], dim=-1) for piece in pieces], dim=1)
    assert logits.shape == ref["logits"].shape
    assert max_rel_diff(logits, ref["logits"]) < FP32_ROUNDING
    loss = torch.cat([piece[0]["loss"] for piece in pieces], dim=1)
    assert max_rel_diff(loss, ref["loss"]) < FP32_ROUNDING
    for piece in pieces:
        grads = merge_state_dicts([r["grads"] for r in piece], replicated_atol=1e-7) if tp > 1 else piece[0]["grads"]
        assert grads.keys() == ref["grads"].keys()
        for key, grad in ref["grads"].items():
            assert grad.abs().max() > 0, f"{key}: zero gradient at CP 1 (the comparison would prove nothing)"
            assert max_rel_diff(grads[key], grad) < FP32_ROUNDING, key


@pytest.mark.parametrize("name", list(VARIANTS))
def test_model_cp2_matches_cp1(name):
    from tests.model.cp_harness import forward_backward
    from tests.model.model_harness import tiny_config

    cfg = tiny_config(**VARIANTS[name])
    ref = run_distributed(forward_backward, world_size=1, args=(cfg, 1, 1), timeout=120)[0]
    ranks = run_distributed(forward_backward, world_size=2, args=(cfg, 1, 2), timeout=120)
    _compare_models(ref, ranks, tp=1)


def test_model_cp2_with_activation_recompute_matches_cp1():
    """megatron's full recompute reruns each layer's forward, exchange included, inside the backward pass."""
    from tests.model.cp_harness import forward_backward
    from tests.model.model_harness import tiny_config

    cfg = tiny_config(**VARIANTS["complex"], recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=1)
    ref = run_distributed(forward_backward, world_size=1, args=(cfg, 1, 1), timeout=120)[0]
    ranks = run_distributed(forward_backward, world_size=2, args=(cfg, 1, 2), timeout=120)
    _compare_models(ref, ranks, tp=1)


def test_model_tp2_cp2_matches_tp1_cp1():
    from tests.model.cp_harness import forward_backward
    from tests.model.model_harness import tiny_config

    cfg = tiny_config(**VARIANTS["complex"])
    ref = run_distributed(forward_backward, world_size=1, args=(cfg, 1, 1), timeout=120)[0]
    ranks = run_distributed(forward_backward, world_size=4, args=(cfg, 2, 2, ref["state"]), timeout=240)
    _compare_models(ref, ranks, tp=2)


def _build_attention_at_cp2():
    from megatron.core import parallel_state

    from tests.model.model_harness import build, tiny_config

    parallel_state.initialize_model_parallel(context_parallel_size=2)
    build(tiny_config(mixer="attention"))


def test_attention_refuses_context_parallelism():
    from hgrn_megatron.testing.distributed import DistributedTestError

    with pytest.raises(DistributedTestError, match="Transformer mixer does not support context parallelism"):
        run_distributed(_build_attention_at_cp2, world_size=2, timeout=120)


# ------------------------------------------------------------------------------------------ long sequences
def _cp_benchmark(seq, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "cp.json"
    result = subprocess.run([sys.executable, str(repo / "benchmarks" / "context_parallel.py"), "--seq", str(seq),
                             "--json", str(out)], cwd=repo, capture_output=True, text=True, timeout=1800, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    cp1, cp2 = json.loads(out.read_text())["rows"]
    assert (cp1["cp"], cp2["cp"]) == (1, 2)
    assert cp2["loss"] == pytest.approx(cp1["loss"], rel=1e-5)
    assert cp2["grad_norm"] == pytest.approx(cp1["grad_norm"], rel=1e-4)
    # Everything a layer saves is per token: each CP 2 rank keeps half of what the one CP 1 rank keeps.
    assert cp2["saved_bytes"] == pytest.approx(cp1["saved_bytes"] / 2, rel=0.02)
    assert cp2["exchanged_bytes"] > 0 and cp1["exchanged_bytes"] == 0


@pytest.mark.slow
def test_context_parallel_benchmark_runs(tmp_path):
    _cp_benchmark(2048, tmp_path)


@pytest.mark.heavy
def test_65536_token_sequence_trains_at_cp2_with_half_the_activations_per_rank(tmp_path):
    _cp_benchmark(65536, tmp_path)
