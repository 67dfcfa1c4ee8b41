"""`--format fla`: flash-linear-attention's HGRNForCausalLM loads the export and gives the native logits.

fla's fused Triton ops (scan, gated norm, SwiGLU) need a GPU, so on CPU they are replaced by their plain-torch
equivalents (fla's own naive scan among them); the model, its config parsing and its weight loading are fla's.
"""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F

from hgrn_megatron.export.__main__ import main as export_main
from tests.export.export_harness import mean_kl, module_checkpoint, relative_error

pytestmark = [
    pytest.mark.distributed,
    # fla announces that it runs its models without Triton on a CPU: expected here.
    pytest.mark.filterwarnings("ignore:Triton is not supported on current platform:UserWarning"),
    pytest.mark.skipif(importlib.util.find_spec("fla") is None,
                       reason="flash-linear-attention (fla) is not installed: `pip install flash-linear-attention`"),
]


@pytest.fixture
def fla_on_cpu(monkeypatch):
    """fla with its Triton ops swapped for plain torch."""
    import fla  # noqa: F401 - registers model_type "hgrn" with transformers
    import fla.layers.hgrn as fla_hgrn
    import fla.modules.mlp as fla_mlp
    from fla.modules import FusedRMSNormGated
    from fla.ops.hgrn.naive import naive_recurrent_hgrn

    def swiglu(x, y):
        return (F.silu(x.float()) * y.float()).to(x.dtype)

    def scan(x, g, initial_state=None, output_final_state=False, **kwargs):
        return naive_recurrent_hgrn(x, g, initial_state, output_final_state)

    def gated_norm(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
        y = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps) * F.silu(g.float())
        return y.to(x.dtype)

    monkeypatch.setattr(fla_hgrn, "swiglu", swiglu)
    monkeypatch.setattr(fla_mlp, "swiglu", swiglu)
    monkeypatch.setattr(fla_hgrn, "chunk_hgrn", scan)
    monkeypatch.setattr(fla_hgrn, "fused_recurrent_hgrn", scan)
    monkeypatch.setattr(FusedRMSNormGated, "forward", gated_norm)


def _run(tmp_path, tokenizer_dir, **model):
    from hgrn_megatron.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    spec = {"run_dir": str(tmp_path / "run"), "model": model, "vocab_size": tok.vocab_size,
            "tokenizer_dir": str(tokenizer_dir), "tokenizer_sha256": tok.sha256}
    return tmp_path / "run", module_checkpoint(spec)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fla_model_gives_native_logits(tmp_path, tokenizer_dir, fla_on_cpu, tied):
    from transformers import AutoModelForCausalLM

    run_dir, reference = _run(tmp_path, tokenizer_dir, variant="real", expand_ratio=2, mixer_norm="rmsnorm",
                              share_embeddings_and_output_weights=tied)
    out = tmp_path / "fla"
    assert export_main(["--checkpoint", str(run_dir), "--out", str(out), "--format", "fla"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "hgrn"
    model = AutoModelForCausalLM.from_pretrained(out, fuse_norm=False, fuse_swiglu=False,
                                                 fuse_cross_entropy=False).eval()
    assert type(model).__module__.startswith("fla.")
    with torch.no_grad():
        logits = model(reference["ids"]).logits
    assert relative_error(logits, reference["logits"]) <= 1e-5
    assert mean_kl(reference["logits"], logits) <= 1e-8


def test_settings_fla_cannot_express_are_refused(tmp_path, tokenizer_dir, capsys):
    run_dir, _ = _run(tmp_path, tokenizer_dir, variant="complex")
    assert export_main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "fla"), "--format", "fla"]) == 2
    err = capsys.readouterr().err
    assert "variant=complex" in err and "mixer_norm=layernorm" in err
    assert not (tmp_path / "fla").exists()


def test_the_paper_form_is_refused_with_each_reason(tmp_path, tokenizer_dir, capsys):
    """fla's HGRN is the authors' code form: a sigmoid gate, the gate before the norm and mixer biases are not
    expressible (a real-variant, RMSNorm model, so these are the only reasons)."""
    run_dir, _ = _run(tmp_path, tokenizer_dir, variant="real", form="paper", mixer_norm="rmsnorm")
    assert export_main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "fla"), "--format", "fla"]) == 2
    err = capsys.readouterr().err
    assert "output_gate_activation=sigmoid" in err and "output_gate_placement=before_norm" in err
    assert "mixer_bias=true" in err and "variant" not in err and "mixer_norm" not in err
    assert not (tmp_path / "fla").exists()
