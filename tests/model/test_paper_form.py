"""The paper's form of the HGRU (HGRN §3.2) as options: what `model.form` sets, the output gate's activation
and placement against a float64 composition, and the mixer biases. TP 2 against TP 1 for these switches is in
test_tensor_parallel.py, parameter and FLOP counts in test_params_and_flops.py, the export in
tests/export/test_parity.py."""
import pytest
import torch
import torch.nn.functional as F

from hgrn_megatron.config import ModelConfig
from hgrn_megatron.config_base import ConfigError
from hgrn_megatron.hgru_ops import gated_norm
from hgrn_megatron.testing.distributed import run_distributed
from tests.model.model_harness import tiny_config


def test_form_sets_the_switches_and_an_explicit_switch_wins():
    ref = ModelConfig.build({})
    assert (ref.form, ref.output_gate_activation, ref.output_gate_placement, ref.mixer_biases) == (
        "reference_code", "silu", "after_norm", False)
    assert ModelConfig.build({"add_bias_linear": True}).mixer_biases  # reference code: follows add_bias_linear
    # A config saved before the switches existed (no such keys) compares equal to one built today.
    assert ref.mixer_bias is None and ModelConfig.build({"add_bias_linear": True}).mixer_bias is None
    paper = ModelConfig.build({"form": "paper"})
    assert (paper.output_gate_activation, paper.output_gate_placement, paper.mixer_bias, paper.mixer_norm,
            paper.add_bias_linear) == ("sigmoid", "before_norm", True, "layernorm", False)
    mixed = ModelConfig.build({"form": "paper", "output_gate_activation": "silu", "mixer_bias": False})
    assert (mixed.output_gate_activation, mixed.output_gate_placement, mixed.mixer_biases) == (
        "silu", "before_norm", False)
    # A dumped config rebuilds to itself (the switches are explicit in it).
    assert ModelConfig.build(paper.model_dump()) == paper
    with pytest.raises(ConfigError, match="form"):
        ModelConfig.build({"form": "preprint"})
    with pytest.raises(ConfigError, match="output_gate_placement"):
        ModelConfig.build({"output_gate_placement": "inside"})


def _reference(h, gate, weight, bias, activation, placement):
    """The output in float64, as the equations write it."""
    act = F.silu if activation == "silu" else torch.sigmoid

    def norm(x):
        if bias is not None:
            return F.layer_norm(x, (x.shape[-1],), weight, bias, 1e-5)
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-5) * weight

    return norm(h * act(gate)) if placement == "before_norm" else norm(h) * act(gate)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("activation,placement", [("sigmoid", "after_norm"), ("silu", "before_norm"),
                                                  ("sigmoid", "before_norm")])
def test_gate_options_match_the_equations(norm, activation, placement):
    g = torch.Generator().manual_seed(3)
    h = (2 + 3 * torch.randn(2, 5, 12, generator=g, dtype=torch.float64)).requires_grad_()
    gate = (3 * torch.randn(2, 5, 12, generator=g, dtype=torch.float64)).requires_grad_()
    weight = (1 + torch.randn(12, generator=g, dtype=torch.float64)).requires_grad_()
    bias = torch.randn(12, generator=g, dtype=torch.float64).requires_grad_() if norm == "layernorm" else None
    leaves = [t for t in (h, gate, weight, bias) if t is not None]

    def fn(h, gate, weight, bias=None):
        return gated_norm(h, gate, weight, bias, 1e-5, activation=activation, placement=placement)

    torch.testing.assert_close(fn(*leaves), _reference(h, gate, weight, bias, activation, placement),
                               rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)
    # fp32: the same values and gradients as the float64 equations
    xs = [t.detach().float().requires_grad_() for t in leaves]
    y32 = fn(*xs)
    weights = torch.linspace(-1, 1, y32.numel()).view_as(y32)
    (y32 * weights).sum().backward()
    y64 = _reference(h, gate, weight, bias, activation, placement)
    grads64 = torch.autograd.grad((y64 * weights.double()).sum(), leaves)
    for got, want in zip([y32] + [x.grad for x in xs], [y64] + list(grads64)):
        assert got.dtype == torch.float32 and (got.double() - want).norm() <= 2e-6 * want.norm()


def test_unknown_gate_options_are_refused():
    h = torch.randn(2, 4)
    with pytest.raises(ValueError, match="activation"):
        gated_norm(h, h, torch.ones(4), None, 1e-5, activation="tanh")


def _mixer_parameters(cfg):
    from tests.model.model_harness import build, init_model_parallel

    init_model_parallel()
    model = build(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


@pytest.mark.distributed
def test_paper_form_has_biases_on_the_mixer_projections_only():
    names = run_distributed(_mixer_parameters, world_size=1, args=(tiny_config(form="paper"),), timeout=120)[0]
    mixer = "decoder.layers.0.self_attention."
    for proj in ("linear_in", "linear_forget", "linear_gate", "linear_out"):
        assert f"{mixer}{proj}.bias" in names
    assert not any(name.startswith("decoder.layers.0.mlp.") and name.endswith(".bias") for name in names)


def test_a_checkpoint_saved_before_the_switches_resumes_under_the_same_settings(tmp_path):
    """A run saved before `form` and its switches existed (its config.yaml has none of them) compares equal to
    the same settings today, biases included, so the resume check lets it continue."""
    import yaml

    from hgrn_megatron.pretrain.checkpoint.load import model_differences

    old = {"preset": "tiny", "add_bias_linear": True, "mixer_norm": "rmsnorm"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": old}))
    assert model_differences(tmp_path, ModelConfig.build(old)) == []
    assert model_differences(tmp_path, ModelConfig.build({**old, "form": "paper"}))  # a real change is reported
