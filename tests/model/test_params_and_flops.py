"""The analytic parameter count equals the built model's, for every preset; the FLOP model's matmul part
equals what torch's FLOP counter measures on the tiny model; the `hgrn-model` command reports them."""
import pytest

from hgrn_megatron.__main__ import main as hgrn_model_main
from hgrn_megatron.config import ModelConfig
from hgrn_megatron.flops import count_parameters, flops_per_token, forward_flops_per_token, matmul_flops_per_token
from hgrn_megatron.presets import PRESETS, REFERENCE_VOCAB_SIZE
from hgrn_megatron.testing.distributed import run_distributed
from tests.model.model_harness import VOCAB, init_model_parallel, measured_matmul_flops, tiny_config

# Presets as they are, plus the switches that change the parameter set.
ABLATIONS = {
    "real-expand2-rmsnorm-nogate": dict(variant="real", expand_ratio=2, mixer_norm="rmsnorm", output_gate=False),
    "no-lower-bound-biases-layernorm": dict(use_lower_bound=False, add_bias_linear=True, norm="layernorm"),
    "paper-form": dict(form="paper"),
    "mixer-biases-only-real": dict(variant="real", mixer_bias=True),
    "attention": dict(mixer="attention"),
    "attention-biases-tied": dict(mixer="attention", add_bias_linear=True, share_embeddings_and_output_weights=True),
}


def _count_on_meta(cfgs):
    from hgrn_megatron.model import build_model

    init_model_parallel()
    return [sum(p.numel() for p in build_model(cfg, REFERENCE_VOCAB_SIZE, meta=True).parameters()) for cfg in cfgs]


@pytest.mark.distributed
def test_parameter_count_analytic_equals_built_for_every_preset():
    cfgs = [ModelConfig.build({"preset": name}) for name in PRESETS]
    cfgs += [ModelConfig.build({"preset": "hgrn-125m", **overrides}) for overrides in ABLATIONS.values()]
    counted = run_distributed(_count_on_meta, world_size=1, args=(cfgs,), timeout=180)[0]
    for cfg, n in zip(cfgs, counted):
        assert count_parameters(cfg, REFERENCE_VOCAB_SIZE) == n, cfg
    # The sizes the presets are named after (documented in presets.py).
    billions = dict(zip(PRESETS, (n / 1e9 for n in counted)))
    assert 0.12 < billions["hgrn-125m"] < 0.13 and 0.34 < billions["hgrn-350m"] < 0.36
    assert 1.0 < billions["hgrn-1b"] < 1.1 and 2.9 < billions["hgrn-3b"] < 3.1 and 6.9 < billions["hgrn-7b"] < 7.1


@pytest.mark.distributed
@pytest.mark.parametrize("overrides", [dict(), dict(variant="real", expand_ratio=2, output_gate=False),
                                       dict(form="paper"), dict(mixer="attention")],
                         ids=["complex", "real", "paper", "attention"])
def test_matmul_flops_match_torch_flop_counter(overrides):
    cfg = tiny_config(reset_at_document_boundary=True, **overrides)
    b, s = 2, 16
    measured = run_distributed(measured_matmul_flops, world_size=1, args=(cfg, b, s), timeout=120)[0]
    analytic = matmul_flops_per_token(cfg, VOCAB, s) * b * s
    if cfg.mixer == "attention":  # counted separately: torch's CPU attention kernel is not a mm
        analytic -= 3 * forward_flops_per_token(cfg, VOCAB, s)["attention_scores"] * b * s
    assert measured == analytic


def test_flops_include_scan_and_gates_and_scale_with_the_model():
    cfg = ModelConfig.build({"preset": "hgrn-1b"})
    parts = forward_flops_per_token(cfg, REFERENCE_VOCAB_SIZE)
    assert parts["scan"] > 0 and parts["elementwise"] > 0
    total = flops_per_token(cfg, REFERENCE_VOCAB_SIZE)
    assert total == pytest.approx(3 * sum(parts.values()))
    # Close to the 6·N rule for the non-embedding weights plus the LM head (the embedding lookup is free).
    n = count_parameters(cfg, REFERENCE_VOCAB_SIZE) - REFERENCE_VOCAB_SIZE * cfg.hidden_size
    assert total == pytest.approx(6 * n, rel=0.01)
    # Attention's cost grows with the sequence; the HGRU's does not.
    assert flops_per_token(cfg, REFERENCE_VOCAB_SIZE, 8192) == total
    attn = cfg.model_copy(update={"mixer": "attention"})
    assert flops_per_token(attn, REFERENCE_VOCAB_SIZE, 8192) > flops_per_token(attn, REFERENCE_VOCAB_SIZE, 2048)


def test_hgrn_model_info_command(capsys):
    assert hgrn_model_main(["info", "--preset", "hgrn-1b", "--vocab-size", "32000"]) == 0
    out = capsys.readouterr().out
    expected = count_parameters(ModelConfig.build({"preset": "hgrn-1b"}), 32000)
    assert f"{expected:,}" in out and "FLOPs/token" in out
    assert hgrn_model_main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)
    assert hgrn_model_main(["info", "--preset", "tiny", "--set", "hidden_sz=3"]) == 2
    assert "did you mean 'hidden_size'" in capsys.readouterr().err
