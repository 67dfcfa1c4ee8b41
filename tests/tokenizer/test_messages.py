"""What the tokenizer says when given the wrong file, and what its help names."""
from __future__ import annotations

from pathlib import Path

import pytest

from hgrn_megatron.tokenizer import Tokenizer, TokenizerError

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"


@pytest.mark.parametrize("name, what", [("tokenizer.vocab", "the vocabulary listing"),
                                        ("tokenizer.meta.json", "the tokenizer's metadata")])
def test_a_file_beside_the_model_is_named_for_what_it_is(name, what):
    with pytest.raises(TokenizerError) as err:
        Tokenizer.load(SHIPPED / name)
    message = str(err.value)
    assert what in message and "not the SentencePiece model" in message
    assert str(SHIPPED / "tokenizer.model") in message and "corrupted" not in message


def test_train_help_names_the_files_it_writes(capsys):
    from hgrn_megatron.tokenizer.__main__ import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "tokenizer.model, tokenizer.vocab, tokenizer.meta.json" in out
