"""`hgrn-tokenizer train`: sampling evenly over shards, the files it writes, and that the result round-trips."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import zstandard

from hgrn_megatron.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer
from hgrn_megatron.tokenizer.__main__ import main

WORDS = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do", "eiusmod",
         "tempor", "incididunt", "ut", "labore"]


def write_shards(root: Path, shards: int = 3, docs: int = 40) -> str:
    rng = random.Random(1)
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        lines = []
        for d in range(docs):
            text = f"shard {s} doc {d}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80)))
            lines.append(json.dumps({"text": text + "\n" + "x = 1234\n", "meta": {"pile_set_name": f"Src{s}"}}))
        lines.insert(5, "{broken json")
        (root / f"{s}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    return str(root / "*.jsonl.zst")


def test_cli_trains_a_tokenizer_that_round_trips(tmp_path, capsys):
    shards = write_shards(tmp_path / "shards")
    out = tmp_path / "tok"
    rc = main(["train", "--shards", shards, "--out", str(out), "--vocab-size", "320", "--sample-documents", "30",
               "--num-threads", "1", "--quiet"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.meta.json", "tokenizer.model", "tokenizer.vocab"]
    tok = Tokenizer.load(out)
    meta = tok.metadata
    assert meta["vocab_size"] == tok.vocab_size == 320
    assert meta["training"]["documents"] == 30
    # Round-robin sampling: 10 documents from each of the three shards.
    assert meta["training"]["documents_by_source"] == {"Src0": 10, "Src1": 10, "Src2": 10}
    assert meta["training"]["skipped_records"] == {"invalid_json": 3}
    text = "lorem ipsum 2025 — unseen ünïcödé and 🙂"
    assert tok.decode(tok.encode(text)) == text
    assert "wrote" in capsys.readouterr().out


def test_unigram_and_character_budget(tmp_path):
    shards = write_shards(tmp_path / "shards", shards=2, docs=60)
    tok = train_tokenizer([shards], tmp_path / "uni", vocab_size=300, model_type="unigram", sample_chars=4000,
                          num_threads=1, progress=False)
    training = tok.metadata["training"]
    assert 4000 <= training["chars"] < 4000 + 700  # stops at the first document past the budget
    assert abs(training["documents_by_source"]["Src0"] - training["documents_by_source"]["Src1"]) <= 1
    assert tok.metadata["model_type"] == "unigram"
    assert tok.decode(tok.encode("dolor sit 77")) == "dolor sit 77"


def test_bad_options_and_paths_are_clear_errors(tmp_path, capsys):
    assert main(["train", "--shards", str(tmp_path / "none-*.jsonl.zst"), "--out", str(tmp_path / "t")]) == 2
    assert "--shards: glob" in capsys.readouterr().err
    with pytest.raises(Exception, match=r"vocab_size"):
        TokenizerTrainConfig.build({"vocab_size": 100})


def test_unusable_samples_and_outputs_are_clear_errors(tmp_path, capsys):
    """Exit 2 with one line, not a SentencePiece traceback: no documents with text, a vocabulary the sample
    cannot fill, --out naming a file; cfg and options together are a programming error."""
    empty = tmp_path / "empty.jsonl.zst"
    empty.write_bytes(zstandard.ZstdCompressor().compress(b'{"content": "no text field"}\n' * 5))
    assert main(["train", "--shards", str(empty), "--out", str(tmp_path / "t1"), "--quiet"]) == 2
    assert "--shards: no usable documents (a non-empty 'text') in the 1 shards" in capsys.readouterr().err

    shards = write_shards(tmp_path / "shards", shards=1, docs=10)
    assert main(["train", "--shards", shards, "--out", str(tmp_path / "t2"), "--vocab-size", "100000",
                 "--num-threads", "1", "--quiet"]) == 2
    assert "SentencePiece could not train on this sample with vocab_size 100000: " in capsys.readouterr().err

    (tmp_path / "a-file").write_text("x")
    assert main(["train", "--shards", shards, "--out", str(tmp_path / "a-file"), "--quiet"]) == 2
    assert "a-file: exists and is not a directory" in capsys.readouterr().err

    with pytest.raises(TypeError, match=r"either cfg or options, not both \(got options \['vocab_size'\]\)"):
        train_tokenizer([shards], tmp_path / "t3", TokenizerTrainConfig.build({}), vocab_size=500)
    with pytest.raises(SystemExit) as exit_info:
        main(["info", str(tmp_path / "t2"), "--tp", "0"])
    assert exit_info.value.code == 2 and "--tp: must be >= 1, got 0" in capsys.readouterr().err


def test_over_long_lines_are_cut_on_character_boundaries():
    """max_sentence_length cuts bytes; a cut inside a multi-byte character moves back to its start, so the
    pieces join up to the line again (a blind cut dropped the straddling character)."""
    from collections import Counter

    from hgrn_megatron.tokenizer.train import _training_lines

    for line, limit in (("ééééé" + "xxx", 5), ("日本語のテキスト" * 3, 7), ("a😀b" * 4, 3), ("😀😀", 2)):
        pieces = list(_training_lines(iter([(line, "src")]), limit, Counter()))
        assert "".join(pieces) == line, pieces
        assert all(len(p.encode()) <= max(limit, 4) for p in pieces), pieces
