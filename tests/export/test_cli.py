"""hgrn-export-hf end to end on cheap checkpoints (the native model's state dict in the engine's layout, as
ZeRO 0 writes it): every ablation switch, bf16, sharded safetensors, a machine without the framework, the
tokenizer files, the fla format, and one clear error for each kind of bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hgrn_megatron.export.__main__ import main as export_main
from tests.export.export_harness import mean_kl, module_checkpoint, relative_error, text_shards

pytestmark = pytest.mark.distributed  # megatron needs a (one-rank gloo) process group to build the model


def make_run(tmp_path, tokenizer_dir, name: str, **model) -> tuple:
    from hgrn_megatron.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    run_dir = tmp_path / name
    spec = {"run_dir": str(run_dir), "model": model, "vocab_size": tok.vocab_size,
            "tokenizer_dir": str(tokenizer_dir), "tokenizer_sha256": tok.sha256}
    return run_dir, module_checkpoint(spec)


def load(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()


ABLATIONS = {
    "complex-rmsnorm-mixer-no-gate": dict(variant="complex", mixer_norm="rmsnorm", output_gate=False),
    "complex-no-bound-bias-tied": dict(variant="complex", use_lower_bound=False, add_bias_linear=True,
                                      share_embeddings_and_output_weights=True),
    "real-x3-layernorm-blocks-reset": dict(variant="real", expand_ratio=3, norm="layernorm",
                                           reset_at_document_boundary=True),
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_every_ablation_exports_with_equal_logits(tmp_path, tokenizer_dir, name):
    run_dir, reference = make_run(tmp_path, tokenizer_dir, name, **ABLATIONS[name])
    assert export_main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    with torch.no_grad():
        logits = load(tmp_path / "hf")(reference["ids"]).logits
    assert relative_error(logits, reference["logits"]) <= 1e-5
    assert mean_kl(reference["logits"], logits) <= 1e-8


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("default-run")
    return make_run(tmp, tokenizer_dir, "run", variant="complex")


def test_bf16_sharded_export(tmp_path, default_run):
    run_dir, reference = default_run
    out = tmp_path / "hf-bf16"
    assert export_main(["--checkpoint", str(run_dir), "--out", str(out), "--dtype", "bf16",
                        "--max-shard-size", "100KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    model = load(out)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(reference["ids"]).logits
    assert mean_kl(reference["logits"], logits) <= 1e-2  # bf16 weights and activations


def test_directory_contents_and_model_card(tmp_path, default_run):
    run_dir, reference = default_run
    out = tmp_path / "hf"
    assert export_main(["--checkpoint", str(run_dir / "checkpoints" / "step-00000005"), "--out", str(out)]) == 0
    names = set(os.listdir(out))
    assert {"config.json", "generation_config.json", "model.safetensors", "configuration_hgrn.py",
            "modeling_hgrn.py", "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hgrn.HGRNForCausalLM"
    assert config["eos_token_id"] == 2 and config["vocab_size"] == reference["logits"].shape[-1]
    card = (out / "README.md").read_text()
    assert "1,280" in card and "| step | 5 |" in card  # tokens trained, step
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def test_runs_without_the_framework_installed(tmp_path, default_run):
    """A fresh interpreter that cannot import hgrn_megatron, megatron or deepspeed loads and generates."""
    run_dir, reference = default_run
    out = tmp_path / "hf"
    assert export_main(["--checkpoint", str(run_dir), "--out", str(out)]) == 0
    torch.save(reference, tmp_path / "reference.pt")
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("hgrn_megatron", "megatron", "deepspeed"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        ref = torch.load({str(tmp_path / "reference.pt")!r})
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        tok = AutoTokenizer.from_pretrained({str(out)!r})
        with torch.no_grad():
            err = ((model(ref["ids"]).logits - ref["logits"]).abs().max() / ref["logits"].abs().max()).item()
        ids = tok("The LORD is my shepherd", return_tensors="pt").input_ids
        text = tok.decode(model.generate(ids, max_new_tokens=5, do_sample=False)[0], skip_special_tokens=True)
        assert not [m for m in sys.modules if m.split(".")[0] in ("hgrn_megatron", "megatron", "deepspeed")]
        print("REL", err, "TEXT", repr(text))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rel = float(result.stdout.split("REL ")[1].split()[0])
    assert rel <= 1e-5
    assert "The LORD is my shepherd" in result.stdout


def test_tokenizer_gives_our_ids_and_text(tmp_path, default_run, tokenizer_dir, sample_texts):
    from transformers import AutoTokenizer

    from hgrn_megatron.tokenizer import Tokenizer

    run_dir, _ = default_run
    out = tmp_path / "hf"
    assert export_main(["--checkpoint", str(run_dir), "--out", str(out)]) == 0
    ours, theirs = Tokenizer.load(tokenizer_dir), AutoTokenizer.from_pretrained(out)
    for text in sample_texts + ["  indented\n\tcode  = 1\n", "naïve café 中文 😀", "</s><s> literal"]:
        ids = ours.encode(text)
        assert theirs(text).input_ids == ids
        assert theirs.decode(ids) == ours.decode(ids) == text
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id, theirs.unk_token_id) == (
        ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_tokenizer_files_for_each_model_type(tmp_path, model_type, sample_texts):
    """The exported tokenizer is verified id for id on write: BPE as a fast tokenizer (no remote code);
    unigram, whose fast lattice can match control and byte pieces written in text, through SentencePiece."""
    from transformers import AutoTokenizer

    from hgrn_megatron.export.tokenizer_files import write_tokenizer_files
    from hgrn_megatron.tokenizer import train_tokenizer

    tok = train_tokenizer(text_shards()[:1], tmp_path / "tok", vocab_size=400, model_type=model_type,
                          sample_chars=200_000, character_coverage=0.995, progress=False)
    (tmp_path / "hf").mkdir()
    info = write_tokenizer_files(tok.model_path, tmp_path / "hf", verify_texts=sample_texts)
    assert info["eos_token_id"] == tok.eos_id and info["vocab_size"] == tok.vocab_size
    if model_type == "bpe":
        assert info["kind"] == "fast"
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=info["kind"] == "sentencepiece")
    for text in sample_texts + ["literal <s> </s> <unk> <0x41> pieces", "  two  spaces\n\tand tabs "]:
        ids = tok.encode(text)
        assert hf(text).input_ids == ids and hf.decode(ids) == tok.decode(ids) == text


# ------------------------------------------------------------------------------ bad input
def run_cli(args, capsys) -> tuple[int, str]:
    code = export_main(args)
    return code, capsys.readouterr().err


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for path, words in ((tmp_path / "empty", "not a checkpoint"), (tmp_path / "file.txt", "not a checkpoint"),
                        (tmp_path / "missing", "no such file")):
        code, err = run_cli(["--checkpoint", str(path), "--out", str(tmp_path / "out")], capsys)
        assert code == 2 and words in err and str(path) in err
        assert err.count("\n") == 1  # one line, no traceback
    assert not (tmp_path / "out").exists()


def test_torn_checkpoint(tmp_path, default_run, capsys):
    import shutil

    run_dir, _ = default_run
    step = tmp_path / "step-00000005"
    shutil.copytree(run_dir / "checkpoints" / "step-00000005", step)
    shard = step / "ds" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated after the manifest was written
    code, err = run_cli(["--checkpoint", str(step), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "not usable" in err and "mp_rank_00_model_states.pt" in err
    (step / "manifest.json").unlink()  # a save that died before its manifest
    code, err = run_cli(["--checkpoint", str(step), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "manifest" in err
    assert not (tmp_path / "out").exists() and not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def test_missing_or_wrong_tokenizer(tmp_path, default_run, capsys):
    run_dir, _ = default_run
    code, err = run_cli(["--checkpoint", str(run_dir), "--out", str(tmp_path / "out"),
                         "--tokenizer", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "tokenizer" in err and "nowhere" in err
    from hgrn_megatron.tokenizer import train_tokenizer

    other = train_tokenizer(text_shards()[:1], tmp_path / "other", vocab_size=400, sample_chars=50_000,
                            character_coverage=0.995, progress=False)
    code, err = run_cli(["--checkpoint", str(run_dir), "--out", str(tmp_path / "out"),
                         "--tokenizer", str(other.model_path)], capsys)
    assert code == 2 and "not the one this checkpoint was trained with" in err
    assert not (tmp_path / "out").exists() and not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def test_existing_output_is_not_replaced_without_overwrite(tmp_path, default_run, capsys):
    run_dir, _ = default_run
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("mine")
    code, err = run_cli(["--checkpoint", str(run_dir), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "already exists" in err and (tmp_path / "out" / "keep").read_text() == "mine"


def test_unknown_parameters_and_mismatched_shards_are_named():
    """The name table and the TP merge refuse what they do not understand, naming the tensor."""
    import torch

    from hgrn_megatron.export.checkpoint_reader import ExportError, merge_tp_shards
    from hgrn_megatron.export.convert import native_state_dict

    with pytest.raises(ExportError, match="decoder.layers.0.self_attention.mystery"):
        native_state_dict({"decoder.layers.0.self_attention.mystery": torch.zeros(2)}, vocab_size=2)
    norm = "decoder.final_layernorm.weight"
    with pytest.raises(ExportError, match="final_layernorm"):  # a replicated tensor that differs between ranks
        merge_tp_shards([{norm: torch.zeros(4)}, {norm: torch.ones(4)}])
    with pytest.raises(ExportError, match="fewer than the tokenizer"):
        native_state_dict({"embedding.word_embeddings.weight": torch.zeros(3, 2)}, vocab_size=5)
