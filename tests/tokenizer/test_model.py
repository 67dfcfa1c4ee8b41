"""The shipped tokenizer: exact round trips for any UTF-8, fixed special ids, metadata checks, vocab padding."""
from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from hgrn_megatron.corpus.records import RecordParser, iter_documents
from hgrn_megatron.tokenizer import SPECIAL_IDS, Tokenizer, TokenizerError, padded_vocab_size, vocab_padding

ASSETS = Path(__file__).resolve().parents[1] / "assets"

TRICKY = [
    "",
    " ",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows newlines\n\n\nand blank lines",
    "    def indented(code):\n        return {'x': [1, 2.5e-3]}\n",
    "digits 0123456789 and 3.14159 and 1,000,000",
    "emoji 😀👍🏽🇫🇷 and CJK 漢字かな한국어 and RTL עברית العربية",
    "ligatures ﬁ ﬂ, full-width ＡＢＣ１２３, compatibility ① Ⅻ ㎏",  # identity normalisation keeps them
    "combining a\u0301 e\u0308 and zero-width \u200b\u200d joiners",
    "control \x00\x01\x07\x1b[0m \x7f and a BOM \ufeff",
    "unknown to the sample: ᚠᚢᚦ ꙮ 𓀀 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


def random_unicode(rng: random.Random, n: int) -> str:
    planes = [(0x20, 0x7E), (0xA0, 0x2FFF), (0x3000, 0xD7FF), (0xE000, 0xFFFD), (0x10000, 0x1FAFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(planes)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_round_trip_is_exact(shipped_tokenizer):
    tok = shipped_tokenizer
    rng = random.Random(0)
    texts = TRICKY + [random_unicode(rng, rng.randint(1, 200)) for _ in range(200)]
    texts += [d.text for _, d in iter_documents(ASSETS / "pile-mini" / "val.jsonl.zst", RecordParser())]
    for text in texts:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.unk_id not in ids, "byte fallback: nothing is unknown"
        assert tok.decode(ids) == text, repr(text[:60])


def test_encode_batch_matches_encode(shipped_tokenizer):
    texts = TRICKY * 3
    assert shipped_tokenizer.encode_batch(texts, num_threads=2) == [shipped_tokenizer.encode(t) for t in texts]


def test_a_document_is_its_ids_then_eos(shipped_tokenizer):
    tok = shipped_tokenizer
    texts = TRICKY * 2
    want = [tok.encode(t) + [tok.eos_id] for t in texts]
    assert [tok.encode_document(t) for t in texts] == want
    assert tok.encode_documents(texts, num_threads=2) == want


def test_a_document_as_an_array_is_its_ids_then_eos(shipped_tokenizer, monkeypatch):
    """The training pipeline's encode (ids written by SentencePiece into an int32 array, EOS added by it) gives
    exactly `encode_document`, on tricky text and on every document of the sample corpus; so does the fallback
    for sentencepiece builds without array output."""
    tok = shipped_tokenizer
    rng = random.Random(1)
    texts = TRICKY + [random_unicode(rng, rng.randint(1, 300)) for _ in range(100)]
    for shard in sorted((ASSETS / "pile-mini").glob("*.jsonl.zst")):
        texts += [d.text for _, d in iter_documents(shard, RecordParser())]
    assert tok._ids_as_array, "the pinned sentencepiece (constraints.txt) returns ids as an array"
    want = [tok.encode_document(t) for t in texts]
    for fast in (True, False):
        monkeypatch.setattr(tok, "_ids_as_array", fast)
        for text, ids in zip(texts, want):
            got = tok.encode_document_array(text)
            assert got.dtype == np.int32 and got.tolist() == ids, (fast, repr(text[:60]))


def test_special_ids_and_digit_splitting(shipped_tokenizer):
    tok = shipped_tokenizer
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3) == tuple(SPECIAL_IDS.values())
    assert tok.vocab_size == 2048
    assert [tok.id_to_piece(i) for i in tok.encode("2024")] == ["2", "0", "2", "4"]
    for special in (tok.bos_id, tok.eos_id, tok.pad_id):
        assert special not in tok.encode("<s></s><pad>"), "special pieces are never produced from text"


def test_padded_vocab_size_matches_megatron():
    assert padded_vocab_size(50257, 1) == 50304  # GPT-2's vocab as Megatron pads it
    assert padded_vocab_size(50257, 8) == 51200
    assert padded_vocab_size(32000, 2) == 32000
    assert padded_vocab_size(2048, 4) == 2048 and padded_vocab_size(2049, 1) == 2176
    assert vocab_padding(2049, 2) == {"vocab_size": 2049, "padded_vocab_size": 2304, "padding": 255,
                                      "multiple": 128, "tp_size": 2}
    with pytest.raises(ValueError):
        padded_vocab_size(100, 0)


def test_load_accepts_the_directory_or_the_model_file(shipped_tokenizer):
    by_file = Tokenizer.load(ASSETS / "tokenizer" / "tokenizer.model")
    recorded = json.loads((ASSETS / "tokenizer" / "tokenizer.meta.json").read_text())["sha256"]
    assert by_file.sha256 == shipped_tokenizer.sha256 == recorded
    clone = pickle.loads(pickle.dumps(shipped_tokenizer))  # how spawned loader workers receive it
    assert clone.encode("pickled tokenizer") == shipped_tokenizer.encode("pickled tokenizer")


def test_load_refuses_a_mismatched_or_incomplete_tokenizer(tmp_path):
    copy = tmp_path / "tok"
    shutil.copytree(ASSETS / "tokenizer", copy)
    meta = json.loads((copy / "tokenizer.meta.json").read_text())

    (copy / "tokenizer.meta.json").write_text(json.dumps({**meta, "sha256": "0" * 64}))
    with pytest.raises(TokenizerError, match=r"tokenizer.model: sha256 .* does not match tokenizer.meta.json"):
        Tokenizer.load(copy)

    (copy / "tokenizer.meta.json").write_text(json.dumps({**meta, "special_ids": {**meta["special_ids"], "eos": 5}}))
    with pytest.raises(TokenizerError, match=r"records .*'eos': 5.* but tokenizer.model has"):
        Tokenizer.load(copy)

    for bad in (None, [0, 1, 2, 3]):
        (copy / "tokenizer.meta.json").write_text(json.dumps({**meta, "special_ids": bad}))
        with pytest.raises(TokenizerError, match=r"tokenizer.meta.json: field 'special_ids' must be an object"):
            Tokenizer.load(copy)

    (copy / "tokenizer.meta.json").unlink()
    with pytest.raises(TokenizerError, match=r"tokenizer.meta.json: metadata file missing"):
        Tokenizer.load(copy)
    with pytest.raises(TokenizerError, match=r"does not exist"):
        Tokenizer.load(tmp_path / "nowhere")


def test_load_refuses_a_model_without_the_fixed_special_ids(tmp_path):
    """A SentencePiece model (with metadata that agrees with it) whose EOS is -1: the data pipeline would append
    -1 to every document, so it is refused with the expected ids."""
    import sentencepiece as spm

    from hgrn_megatron.tokenizer.model import METADATA_FORMAT, SPECIAL_IDS, sha256_file

    text = [f"the quick brown fox jumps over the lazy dog {i}" for i in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=40, unk_id=0, bos_id=1, eos_id=-1, pad_id=-1, minloglevel=2)
    special = {"unk": 0, "bos": 1, "eos": -1, "pad": -1}
    (tmp_path / "tokenizer.meta.json").write_text(json.dumps({
        "format": METADATA_FORMAT, "sha256": sha256_file(tmp_path / "tokenizer.model"), "vocab_size": 40,
        "special_ids": special}))
    with pytest.raises(TokenizerError, match=rf"special ids .*'eos': -1.*, expected {SPECIAL_IDS}"):
        Tokenizer.load(tmp_path)


def test_metadata_name_leaves_tokenizer_json_to_hugging_face(tmp_path):
    """A folder of an earlier version (metadata in tokenizer.json) still loads; a Hugging Face tokenizer.json
    beside a tokenizer.model is not taken for metadata (the folder then lacks its tokenizer.meta.json)."""
    legacy = tmp_path / "legacy"
    shutil.copytree(ASSETS / "tokenizer", legacy)
    (legacy / "tokenizer.meta.json").rename(legacy / "tokenizer.json")
    assert Tokenizer.load(legacy).sha256 == Tokenizer.load(ASSETS / "tokenizer").sha256

    hf_style = tmp_path / "hf"
    hf_style.mkdir()
    shutil.copy(ASSETS / "tokenizer" / "tokenizer.model", hf_style)
    (hf_style / "tokenizer.json").write_text(json.dumps({"version": "1.0", "added_tokens": [], "model": {}}))
    with pytest.raises(TokenizerError, match=r"tokenizer.meta.json: metadata file missing"):
        Tokenizer.load(hf_style)
