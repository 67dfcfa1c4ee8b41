"""Details of the exported directory a first user meets: file permissions, no position limit on a recurrent
model's generate, and a tokenizer that loads without remote code (no trust prompt)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from hgrn_megatron.export.__main__ import main as export_main
from tests.export.test_cli import make_run

pytestmark = pytest.mark.distributed  # megatron needs a (one-rank gloo) process group to build the model


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("export-files")
    run_dir, _ = make_run(tmp, tokenizer_dir, "run", variant="complex")
    old = os.umask(0o022)
    try:
        assert export_main(["--checkpoint", str(run_dir), "--out", str(tmp / "hf")]) == 0
    finally:
        os.umask(old)
    return tmp / "hf"


def test_every_exported_file_is_0644_like_a_plain_write(exported):
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in exported.iterdir() if p.is_file()}
    assert "model.safetensors" in modes
    assert modes == {name: 0o644 for name in modes}


def test_generate_past_the_training_length_neither_warns_nor_stops(exported):
    from transformers import AutoModelForCausalLM

    config = json.loads((exported / "config.json").read_text())
    assert config.get("max_position_embeddings") is None and config["training_seq_length"] > 0
    model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()
    length = config["training_seq_length"] + 8
    ids = torch.ones(1, 4, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the max-length reminder is a UserWarning
        with torch.no_grad():
            out = model.generate(ids, max_length=length, min_length=length, do_sample=False)
    assert out.shape[1] == length


def test_the_tokenizer_loads_with_a_stock_class_and_without_a_prompt(exported, tokenizer_dir):
    """The model card's snippets in a fresh interpreter with no terminal: the stock PreTrainedTokenizerFast
    needs no remote code; AutoTokenizer reads config.json (the model's own code) first, so it is called with
    trust_remote_code=True. Without it transformers asks (a 15-second prompt that stalls a notebook)."""
    from hgrn_megatron.tokenizer import Tokenizer

    card = (exported / "README.md").read_text()
    assert "PreTrainedTokenizerFast.from_pretrained(PATH)" in card
    assert "AutoTokenizer.from_pretrained(PATH)" not in card
    expected = Tokenizer.load(tokenizer_dir).encode("Hello, world!")
    for load in ("PreTrainedTokenizerFast.from_pretrained(DIR)", "AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)",
                 "AutoTokenizer.from_pretrained(DIR)"):
        code = textwrap.dedent(f"""
            from transformers import AutoTokenizer, PreTrainedTokenizerFast
            DIR = {str(exported)!r}
            print("ids:", {load}("Hello, world!").input_ids)
        """)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout.rsplit("ids:", 1)[1]) == expected  # after the prompt, if one was shown
        asked = "custom code" in done.stdout + done.stderr
        assert asked == (load == "AutoTokenizer.from_pretrained(DIR)"), load  # the last: why the snippets avoid it
