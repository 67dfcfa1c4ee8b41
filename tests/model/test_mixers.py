"""The mixer registry: a new mixer is its own module plus one registry line.

`tests/model/toy_mixer.py` is such a module (a gated running mean); registered here with one line, it is
accepted by the config and the `hgrn-model` command, builds, trains, is counted exactly by the parameter and
FLOP model, and splits over TP = 2 by its own rules — with no other file knowing its name.
"""
import dataclasses

import pytest
import torch

from hgrn_megatron.__main__ import main as hgrn_model_main
from hgrn_megatron.config import ModelConfig
from hgrn_megatron.config_base import ConfigError
from hgrn_megatron.export.checkpoint_reader import ExportError
from hgrn_megatron.export.convert import hf_config_dict
from hgrn_megatron.flops import count_parameters, matmul_flops_per_token
from hgrn_megatron.mixers import MIXERS, get_mixer
from hgrn_megatron.partition import COLUMN
from hgrn_megatron.testing.distributed import run_distributed
from hgrn_megatron.tp_rules import rule_for
from tests.model import toy_mixer
from tests.model.model_harness import (
    VOCAB,
    assert_tp2_matches_tp1,
    build,
    init_model_parallel,
    max_rel_diff,
    measured_matmul_flops,
    packed_vs_fresh,
    run_tp1_and_tp2,
    tiny_config,
    train_steps,
)

TOY = "running_mean"
TRAIN_STEPS = 12


@pytest.fixture
def registered(monkeypatch):
    """The one registry line of a new mixer (undone after the test)."""
    monkeypatch.setitem(MIXERS, TOY, toy_mixer.RUNNING_MEAN)


def test_running_mean_matches_a_float64_loop():
    g = torch.Generator().manual_seed(3)
    values = torch.randn(9, 2, 4, generator=g, dtype=torch.float64)
    reset = torch.zeros(2, 9, dtype=torch.bool)
    reset[0, [0, 4]] = True
    reset[1, [3, 5, 6]] = True  # row 1's first document starts at token 0 without a mark
    expected = torch.empty_like(values)
    for b in range(2):
        start = 0
        for t in range(9):
            start = t if reset[b, t] else start
            expected[t, b] = values[start:t + 1, b].mean(dim=0)
    assert torch.allclose(toy_mixer.running_mean(values, reset), expected, rtol=0, atol=1e-12)
    assert torch.allclose(toy_mixer.running_mean(values, None), values.cumsum(0) / torch.arange(1, 10)[:, None, None])


def test_config_and_command_accept_exactly_the_registered_mixers(monkeypatch, capsys):
    with pytest.raises(ConfigError, match=f"model.mixer: not a registered mixer; choose one of: hgrn, attention "
                                          f"\\(got '{TOY}'\\)"):
        ModelConfig.build({"mixer": TOY}, where="model")
    with pytest.raises(KeyError, match=f"unknown mixer '{TOY}'; choose one of: hgrn, attention"):
        get_mixer(TOY)
    monkeypatch.setitem(MIXERS, TOY, toy_mixer.RUNNING_MEAN)
    cfg = ModelConfig.build({"preset": "hgrn-125m", "mixer": TOY})
    assert hgrn_model_main(["info", "--preset", "hgrn-125m", "--mixer", TOY]) == 0
    assert f"{count_parameters(cfg, 50304):,}" in capsys.readouterr().out


def _build_count_measure_and_train(cfg):
    from hgrn_megatron.model import build_model

    init_model_parallel()
    built = sum(p.numel() for p in build_model(cfg, VOCAB, meta=True).parameters())
    model = build(cfg, seed=0)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = train_steps(model, TRAIN_STEPS)
    unchanged = [name for name, p in model.named_parameters() if torch.equal(p.detach(), initial[name])]
    return built, losses, unchanged


@pytest.mark.distributed
def test_registered_mixer_builds_trains_and_is_counted_exactly(registered):
    cfg = tiny_config(mixer=TOY, reset_at_document_boundary=True, add_bias_linear=True)
    built, losses, unchanged = run_distributed(_build_count_measure_and_train, world_size=1, args=(cfg,),
                                               timeout=120)[0]
    assert built == count_parameters(cfg, VOCAB)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.9 * losses[0], losses
    assert unchanged == []  # every parameter, the mixer's included, was trained
    b, s = 2, 16
    measured = run_distributed(measured_matmul_flops, world_size=1, args=(cfg, b, s), timeout=120)[0]
    assert measured == matmul_flops_per_token(cfg, VOCAB, s) * b * s


@pytest.mark.distributed
def test_registered_mixer_splits_over_tp2_by_its_own_rules(registered):
    cfg = tiny_config(mixer=TOY, reset_at_document_boundary=True, add_bias_linear=True)
    tp1, tp2 = run_tp1_and_tp2(cfg)
    assert_tp2_matches_tp1(tp1, tp2)
    assert {"decoder.layers.1.self_attention.linear_value.weight",
            "decoder.layers.1.self_attention.linear_out.bias"} <= set(tp1["grads"])


@pytest.mark.distributed
def test_registered_mixer_gets_document_starts_as_it_describes(registered):
    """document_mask "reset": the model hands the mixer doc_start, and the tokens after a start see a fresh
    sequence (the toy has no position embedding, so the equality is exact up to rounding)."""
    cfg = tiny_config(mixer=TOY, reset_at_document_boundary=True)
    r = run_distributed(packed_vs_fresh, world_size=1, args=([cfg],), timeout=120)[0][0]
    assert max_rel_diff(r["packed"], r["fresh"]) < 1e-5
    assert max_rel_diff(r["packed_without_mask"], r["fresh"]) > 1e-3


def test_tp_rules_come_from_the_registry(monkeypatch):
    name = "decoder.layers.2.self_attention.linear_value.weight"
    with pytest.raises(KeyError, match="no partition rule"):
        rule_for(name)
    monkeypatch.setitem(MIXERS, TOY, toy_mixer.RUNNING_MEAN)
    assert rule_for(name) == COLUMN
    # A mixer that splits a name another mixer shares (the HGRU's linear_out) differently is refused.
    clash = dataclasses.replace(toy_mixer.RUNNING_MEAN, tp_rules=((r"linear_out\.weight", COLUMN),))
    monkeypatch.setitem(MIXERS, "clash", clash)
    with pytest.raises(ValueError, match="linear_out.weight' matches rules that disagree"):
        rule_for("decoder.layers.0.self_attention.linear_out.weight")


def test_export_asks_the_registry(monkeypatch):
    model_cfg = ModelConfig.build({"preset": "tiny"}).model_dump()
    assert hf_config_dict(model_cfg, 250, {})["hidden_size"] == 64
    monkeypatch.setitem(MIXERS, TOY, toy_mixer.RUNNING_MEAN)
    for mixer in ("attention", TOY, "retired"):
        with pytest.raises(ExportError, match=f"model.mixer='{mixer}': only models with mixer hgrn can be exported"):
            hf_config_dict({**model_cfg, "mixer": mixer}, 250, {})


def test_a_description_states_known_mask_and_position_kinds():
    with pytest.raises(ValueError, match="document_mask must be one of"):
        dataclasses.replace(toy_mixer.RUNNING_MEAN, document_mask="causal")
    with pytest.raises(ValueError, match="position_embedding must be one of"):
        dataclasses.replace(toy_mixer.RUNNING_MEAN, position_embedding="alibi")
