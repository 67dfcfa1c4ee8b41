"""Fixtures for the tokenizer tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from hgrn_megatron.tokenizer import Tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@pytest.fixture(scope="session")
def shipped_tokenizer():
    return Tokenizer.load(ASSETS / "tokenizer")
