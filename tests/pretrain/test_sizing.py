"""`hgrn-pretrain --dry-run` sizing: memory lines checked against the ZeRO accounting and the measured
activation counts by hand, the longest sequence, batch suggestions and the lanes warning."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from hgrn_megatron.flops import count_parameters
from hgrn_megatron.pretrain import EXIT_CONFIG_ERROR, sizing
from hgrn_megatron.pretrain.__main__ import main
from hgrn_megatron.pretrain.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GiB = 2**30
KiB = 1024
VOCAB = 50304  # the reference vocabulary the plan counts with when the cluster tokenizer is absent


def _plan(capsys, name: str, world: int, *extra: str) -> str:
    assert main(["--config", str(CONFIGS / name), "--dry-run", "--world-size", str(world), *extra]) == 0
    return capsys.readouterr().out


def _gib(out: str, label: str) -> float:
    return float(re.search(rf"{label} ([0-9.]+) GiB", out).group(1))


def test_hgrn_1b_on_64_gpus_matches_the_zero_accounting_by_hand(capsys):
    out = _plan(capsys, "hgrn-1b.yaml", 64)
    p = count_parameters(load_config(str(CONFIGS / "hgrn-1b.yaml")).model, VOCAB)
    # bf16 weights and gradients whole on every rank at ZeRO 1; fp32 master + 2 moments over 64 ranks;
    # fp32 accumulation buffer (grad_accum_dtype: fp32); buckets 2 x 2e8 bf16 elements.
    assert _gib(out, "weights") == pytest.approx(2 * p / GiB, abs=0.006)
    assert _gib(out, "gradients") == pytest.approx(2 * p / GiB, abs=0.006)
    assert _gib(out, "optimizer") == pytest.approx(12 * p / 64 / GiB, abs=0.006)
    assert _gib(out, "fp32 grad accumulation") == pytest.approx(4 * p / GiB, abs=0.006)
    assert _gib(out, "communication buckets") == pytest.approx(2 * 4e8 / GiB, abs=0.006)
    # activations: micro-batch 4 x 2048 tokens x 16 layers x 148.5 KiB (docs/LAUNCH.md's CPU count at TP 1)
    assert _gib(out, "layers") == pytest.approx(4 * 2048 * 16 * 148.5 * KiB / GiB, abs=0.006)
    # the loss keeps fp32 logits: 4 bytes x vocabulary per token
    assert _gib(out, "full fp32 logits:") == pytest.approx(4 * 2048 * 4 * VOCAB / GiB, abs=0.006)
    assert "fits in 80 GiB" in out and "8 nodes of 8 GPUs" in out and "WARNING" not in out
    # time: 105 B tokens at 45 % of 989 TFLOP/s on 64 GPUs
    flops = float(re.search(r"([0-9.e+]+) training FLOPs/token", out).group(1))
    hours = 100_000 * 512 * 2048 * flops / (64 * 0.45 * 989e12) / 3600
    assert f"steps in {hours:,.1f} h" in out


def test_hgrn_7b_at_512_gpus_shards_over_tp_and_warns_about_lanes(capsys):
    out = _plan(capsys, "hgrn-7b.yaml", 512)
    cfg = load_config(str(CONFIGS / "hgrn-7b.yaml"))
    p = count_parameters(cfg.model, 50432)  # padded to a multiple of 128 x TP 2
    assert "world 512 = TP 2 x DP 256" in out
    assert _gib(out, "weights") == pytest.approx(2 * p / 2 / GiB, abs=0.006)
    assert _gib(out, "optimizer") == pytest.approx(12 * p / 2 / 256 / GiB, abs=0.006)
    # 2048 tokens x 32 layers x 148.5 KiB per token per layer (docs/LAUNCH.md: hgrn-7b at TP 2 with sequence
    # parallelism, as shipped; 183.5 KiB without)
    assert cfg.parallel.sequence_parallel
    assert _gib(out, "layers") == pytest.approx(2048 * 32 * 148.5 * KiB / GiB, abs=0.006)
    assert "64 nodes of 8 GPUs" in out
    assert "WARNING: data.lanes" not in out  # the shipped 1,024 lanes serve DP 256
    # Lanes are fixed for a run: too few for the data-parallel size is warned about (and a fix suggested).
    out = _plan(capsys, "hgrn-7b.yaml", 512, "data.lanes=128")
    assert "WARNING: data.lanes (128) is not a multiple of DP 256" in out and "e.g. 256" in out


def test_a_batch_that_does_not_split_over_2048_gpus_gets_suggestions(capsys):
    rc = main(["--config", str(CONFIGS / "hgrn-1b.yaml"), "--dry-run", "--world-size", "2048"])
    err = capsys.readouterr().err
    assert rc == EXIT_CONFIG_ERROR
    assert "(4 x 2048 = 8192)" in err
    assert "train.global_batch_size=8192" in err
    assert "at micro-batch 4: 128 GPUs (DP 128)" in err and "at micro-batch 1: 512 GPUs (DP 512)" in err


def test_every_suggested_batch_fix_passes_the_world_check():
    config = str(CONFIGS / "hgrn-1b.yaml")
    fixes = sizing.batch_fixes(512, 4, 2048, 1)
    assert len(fixes) == 3
    load_config(config, ["train.global_batch_size=8192"]).validate_world(2048)
    load_config(config).validate_world(128)
    load_config(config, ["train.micro_batch_size=1"]).validate_world(512)
    # 1000 samples over 48 ranks (TP 2): the nearest multiples of 4 x 48, and the DP sizes that divide
    fixes = sizing.batch_fixes(1000, 4, 48, 2)
    assert fixes[0].startswith("train.global_batch_size=960 or 1152")
    assert fixes[1:] == ["at micro-batch 4: 50 GPUs (DP 25) or 100 GPUs (DP 50)", "at micro-batch 1: 80 GPUs (DP 40)"]


def test_longest_sequence_is_the_edge_of_the_memory_model():
    cfg = load_config(str(CONFIGS / "hgrn-1b.yaml"))
    p = count_parameters(cfg.model, VOCAB)
    budget = 80 * GiB
    for cp in (1, 2):
        lay = sizing.Layout(world=64, tp=1, cp=cp, dp=64 // cp)
        n = sizing.longest_sequence(cfg, p, VOCAB, lay, budget)
        assert n % (1024 * cp) == 0
        assert sizing.memory(cfg, p, VOCAB, lay, n, 1).total <= budget
        assert sizing.memory(cfg, p, VOCAB, lay, n + 1024 * cp, 1).total > budget
    one = sizing.longest_sequence(cfg, p, VOCAB, sizing.Layout(64, 1, 1, 64), budget)
    two = sizing.longest_sequence(cfg, p, VOCAB, sizing.Layout(64, 1, 2, 32), budget)
    assert 1.9 * one <= two <= 2.1 * one  # CP divides a sequence's activations


def test_recompute_and_the_chunked_loss_shrink_activations():
    cfg = load_config(str(CONFIGS / "hgrn-1b.yaml"), ["model.recompute_granularity=full"])
    plain = load_config(str(CONFIGS / "hgrn-1b.yaml"))
    lay = sizing.Layout(64, 1, 1, 64)
    # uniform recompute: 16 layer inputs of 2048 bf16 values, plus one layer running again
    assert sizing.layers_bytes_per_token(cfg, 1) == 16 * 2 * 2048 + 148.5 * KiB
    assert sizing.layers_bytes_per_token(plain, 1) == 16 * 148.5 * KiB
    mem = sizing.memory(plain, 10**9, VOCAB, lay)
    assert mem.logits_other < mem.logits  # the chunked loss keeps one chunk's logits, not the micro-batch's


def test_the_long_context_table_rows_are_the_longest_sequences():
    table = sizing.long_context_table([str(CONFIGS / "hgrn-1b.yaml")], cps=(1, 2))
    rows = [line for line in table.splitlines() if line.startswith("| hgrn-1b")]
    assert len(rows) == 2
    cfg = load_config(str(CONFIGS / "hgrn-1b.yaml"), ["parallel.context_parallel_size=2"])
    lay = sizing.layout(cfg, 64)
    n = sizing.longest_sequence(cfg, count_parameters(cfg.model, 32000), 32000, lay, 80 * GiB, chunk=None)
    assert rows[1].startswith(f"| hgrn-1b.yaml | 1 | 2 | 32 | {n // 1024:,} k |")
    off, full, chunked = (int(c.strip().removesuffix(" k").replace(",", "")) for c in rows[1].split("|")[5:8])
    assert off < full < chunked  # recompute frees the layers' activations, the chunked loss the logits


def test_context_parallel_divides_the_activations_and_a_small_gpu_does_not_fit(capsys):
    one = _plan(capsys, "hgrn-1b.yaml", 64)
    two = _plan(capsys, "hgrn-1b.yaml", 64, "parallel.context_parallel_size=2", "--gpu-memory-gib", "24")
    assert "world 64 = TP 1 x CP 2 x DP 32" in two
    assert _gib(two, "layers") == pytest.approx(_gib(one, "layers") / 2, abs=0.01)
    assert _gib(two, "optimizer") == _gib(one, "optimizer")  # ZeRO shards over DP x CP: 64 ranks either way
    assert "fits in 24 GiB" in two
    small = _plan(capsys, "hgrn-1b.yaml", 64, "--gpu-memory-gib", "24")
    assert "DOES NOT FIT in 24 GiB" in small


def test_sequence_parallelism_splits_the_replicated_activations_over_tp(capsys):
    plain = load_config(str(CONFIGS / "hgrn-7b.yaml"), ["parallel.sequence_parallel=false"])
    sp = load_config(str(CONFIGS / "hgrn-7b.yaml"), ["parallel.sequence_parallel=true"])
    d = plain.model.hidden_size
    assert plain.parallel.tensor_parallel_size == 2
    # every byte a layer saves is split: half of TP 1's 74.25 bytes per unit, against 56.75 / 2 + 17.5 without SP
    assert sizing.layer_bytes_per_token(sp, 2) == pytest.approx(74.25 / 2 * d)
    assert sizing.layer_bytes_per_token(plain, 2) == pytest.approx((56.75 / 2 + 17.5) * d)
    assert sizing.layer_bytes_per_token(sp, 1) == sizing.layer_bytes_per_token(plain, 1)  # a no-op at TP 1
    off = _plan(capsys, "hgrn-7b.yaml", 64, "parallel.sequence_parallel=false")
    on = _plan(capsys, "hgrn-7b.yaml", 64, "parallel.sequence_parallel=true")
    assert "sequence parallel off" in off and "sequence parallel on" in on
    assert _gib(on, "layers") == pytest.approx(_gib(off, "layers") * 74.25 / (56.75 + 2 * 17.5), abs=0.01)
    row = next(line for line in sizing.long_context_table([str(CONFIGS / "hgrn-7b.yaml")], cps=(1,)).splitlines()
               if line.startswith("| hgrn-7b"))
    cells = [int(c.strip().removesuffix(" k").replace(",", "")) for c in row.split("|")[5:11]]
    assert all(with_sp > without for without, with_sp in zip(cells[:3], cells[3:]))
