"""Export tests: a tiny tokenizer of the framework's own format, shared by every test in this folder."""
from __future__ import annotations

import pathlib

import pytest

ASSET_TOKENIZER = pathlib.Path(__file__).resolve().parents[1] / "assets" / "tokenizer"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> pathlib.Path:
    """The shipped test tokenizer, or (before one ships) a 512-piece BPE model trained on the sample text."""
    from hgrn_megatron.tokenizer import Tokenizer, train_tokenizer
    from tests.export.export_harness import text_shards

    if (ASSET_TOKENIZER / "tokenizer.model").is_file():
        Tokenizer.load(ASSET_TOKENIZER)
        return ASSET_TOKENIZER
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(text_shards()[:1], out, vocab_size=512, sample_chars=300_000, character_coverage=0.995,
                    progress=False)
    return out


@pytest.fixture(scope="session")
def sample_texts() -> list[str]:
    """A few real documents (Pile format) for tokenizer parity."""
    import io
    import json

    import zstandard

    from tests.export.export_harness import text_shards

    texts = []
    with open(text_shards()[-1], "rb") as fh:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8")
        for line in reader:
            texts.append(json.loads(line)["text"][:4000])
            if len(texts) == 12:
                break
    return texts


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These tests run many tiny ops (decode steps, small models): on a shared 2-core machine two OpenMP
    threads cost far more in synchronisation than they save. Restored after each test."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
