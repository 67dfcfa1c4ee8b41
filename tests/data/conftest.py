"""Fixtures for the data-pipeline tests: the shipped tokenizer and a small synthetic corpus of real zstd shards."""
from __future__ import annotations

import pytest

from hgrn_megatron.tokenizer import Tokenizer
from tests.data.data_harness import ASSETS, write_corpus


@pytest.fixture(scope="session")
def tokenizer():
    return Tokenizer.load(ASSETS / "tokenizer")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))
