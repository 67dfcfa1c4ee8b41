"""`Tokenizer`: a trained SentencePiece model plus its metadata file, checked on load.

A tokenizer directory holds `tokenizer.model`, `tokenizer.vocab` and `tokenizer.meta.json` (metadata: vocab
size, special ids, the model file's sha256, how it was trained; not `tokenizer.json`, which is Hugging Face's
fast-tokenizer file, so neither tool misreads the other's folder). Loading recomputes the sha256 and compares, so a run
never silently trains or resumes with a different tokenizer than the one recorded.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

METADATA_FORMAT = "hgrn-tokenizer/1"
MODEL_FILE, VOCAB_FILE, METADATA_FILE = "tokenizer.model", "tokenizer.vocab", "tokenizer.meta.json"
# Fixed special ids: the same in every model this project trains.
SPECIAL_IDS = {"unk": 0, "bos": 1, "eos": 2, "pad": 3}


class TokenizerError(ValueError):
    """A missing, corrupt or mismatched tokenizer file; names the file."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def padded_vocab_size(vocab_size: int, tp_size: int, multiple: int = 128) -> int:
    """The embedding rows: `vocab_size` rounded up to a multiple of `multiple * tp_size`.

    As Megatron-LM pads (megatron/training/tokenizer/tokenizer.py, `_vocab_size_with_padding`): every TP rank
    gets an equal, aligned slice of the vocabulary. The padding rows are never produced by the tokenizer.
    """
    if vocab_size <= 0 or tp_size <= 0 or multiple <= 0:
        raise ValueError(
            f"padded_vocab_size: sizes must be positive (vocab {vocab_size}, tp {tp_size}, multiple {multiple})"
        )
    unit = multiple * tp_size
    return -(-vocab_size // unit) * unit


def vocab_padding(vocab_size: int, tp_size: int, multiple: int = 128) -> dict:
    """The padding, as recorded in a run's state: sizes and how many rows are padding."""
    padded = padded_vocab_size(vocab_size, tp_size, multiple)
    return {"vocab_size": vocab_size, "padded_vocab_size": padded, "padding": padded - vocab_size,
            "multiple": multiple, "tp_size": tp_size}


def metadata_path_for(model_path: Path) -> Path:
    """`DIR/name.model` -> `DIR/name.meta.json`, or the `DIR/name.json` that earlier versions wrote when only
    that exists and holds this project's metadata (not a Hugging Face tokenizer.json)."""
    current = model_path.with_suffix(".meta.json")
    legacy = model_path.with_suffix(".json")
    if not current.is_file() and legacy.is_file():
        try:
            if json.loads(legacy.read_text()).get("format") == METADATA_FORMAT:
                return legacy
        except (OSError, ValueError, AttributeError):
            pass
    return current


def _companion_file_note(path: Path) -> str | None:
    """What to say when `path` is one of the files beside the model rather than the model itself."""
    model = path.parent / MODEL_FILE if path.name in (VOCAB_FILE, METADATA_FILE) else path.with_suffix(".model")
    if path.suffix == ".vocab":
        what = "the vocabulary listing (one piece and its score per line, for reading)"
    elif path.name.endswith(".meta.json"):
        what = "the tokenizer's metadata"
    else:
        return None
    return f"{path} is {what}, not the SentencePiece model: pass {model} or its directory"


def _supports_array_output(sp: spm.SentencePieceProcessor) -> bool:
    """Whether this sentencepiece build returns ids as an int32 array (`out_type="numpy"`, newer releases)."""
    try:
        probe = sp.encode("a", out_type="numpy", add_eos=True)
    except (TypeError, ValueError, AttributeError, RuntimeError):
        return False
    return isinstance(probe, np.ndarray) and probe.dtype == np.int32 and list(probe) == sp.encode("a") + [sp.eos_id()]


class Tokenizer:
    """A SentencePiece tokenizer with fixed special ids (unk 0, bos 1, eos 2, pad 3) and byte fallback."""

    def __init__(self, model_path: str | Path, metadata: dict):
        self.model_path = Path(model_path)
        self.metadata = metadata
        self.sha256 = metadata["sha256"]
        self._sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        self.vocab_size = self._sp.get_piece_size()
        self.unk_id, self.bos_id = self._sp.unk_id(), self._sp.bos_id()
        self.eos_id, self.pad_id = self._sp.eos_id(), self._sp.pad_id()
        self._ids_as_array = _supports_array_output(self._sp)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from the `.model` file or its directory; check the metadata file's sha256, size and ids."""
        path = Path(path)
        model_path = path / MODEL_FILE if path.is_dir() else path
        if not model_path.is_file():
            raise TokenizerError(f"tokenizer model {model_path} does not exist (train one with `hgrn-tokenizer train`)")
        if not_the_model := _companion_file_note(model_path):
            raise TokenizerError(not_the_model)
        meta_path = metadata_path_for(model_path)
        if not meta_path.is_file():
            raise TokenizerError(f"{meta_path}: metadata file missing; every tokenizer.model needs its {METADATA_FILE}")
        try:
            metadata = json.loads(meta_path.read_text())
        except (OSError, ValueError) as err:
            raise TokenizerError(f"{meta_path}: not readable JSON ({err})") from None
        if not isinstance(metadata, dict) or metadata.get("format") != METADATA_FORMAT:
            raise TokenizerError(f"{meta_path}: expected a metadata object with format '{METADATA_FORMAT}'")
        actual = sha256_file(model_path)
        if metadata.get("sha256") != actual:
            raise TokenizerError(
                f"{model_path}: sha256 {actual[:16]}... does not match {meta_path.name} "
                f"({str(metadata.get('sha256'))[:16]}...); the model file was replaced or corrupted"
            )
        try:
            tok = cls(model_path, metadata)
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"{model_path}: not a SentencePiece model ({err})") from None
        special = metadata.get("special_ids")
        if not isinstance(special, dict):
            raise TokenizerError(f"{meta_path}: field 'special_ids' must be an object like {SPECIAL_IDS}, "
                                 f"got {special!r}")
        recorded = {"vocab_size": metadata.get("vocab_size"), **special}
        found = {
            "vocab_size": tok.vocab_size, "unk": tok.unk_id, "bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id
        }
        if recorded != found:
            raise TokenizerError(f"{meta_path}: records {recorded}, but {model_path.name} has {found}")
        if special != SPECIAL_IDS:  # the data pipeline, the model and the HF export rely on these ids
            raise TokenizerError(f"{model_path}: special ids {special}, expected {SPECIAL_IDS} "
                                 "(train it with hgrn-tokenizer train)")
        return tok

    # ------------------------------------------------------------ encoding
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS added); any UTF-8 round-trips through `decode` via byte fallback."""
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts with SentencePiece's own thread pool (`num_threads` default: all CPUs)."""
        return self._sp.encode(list(texts), num_threads=num_threads or os.cpu_count() or 1)

    def encode_document(self, text: str) -> list[int]:
        """A document as training and validation samples hold it: its ids, then EOS (which ends every document)."""
        ids = self._sp.encode(text)
        ids.append(self.eos_id)
        return ids

    def encode_document_array(self, text: str) -> np.ndarray:
        """`encode_document` as a read-only int32 array, which is how the training pipeline holds a document.

        SentencePiece writes the ids (EOS included) into one buffer when it can (sentencepiece's `numpy` output):
        no Python int per token, no list to convert: about 5 % less CPU per document than `encode_document`
        followed by a conversion to an array (docs/BENCHMARKS.md, data pipeline).
        """
        if self._ids_as_array:
            return self._sp.encode(text, out_type="numpy", add_eos=True)
        ids = self.encode_document(text)
        return np.fromiter(ids, dtype=np.int32, count=len(ids))

    def encode_documents(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """`encode_document` of many texts, on SentencePiece's thread pool (see `encode_batch`)."""
        batch = self.encode_batch(texts, num_threads)
        for ids in batch:
            ids.append(self.eos_id)
        return batch

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    # Workers started with spawn receive the tokenizer by pickling: send the path, reload (and re-check) there.
    def __getstate__(self):
        return {"model_path": str(self.model_path), "sha256": self.sha256}

    def __setstate__(self, state):
        other = Tokenizer.load(state["model_path"])
        if other.sha256 != state["sha256"]:
            raise TokenizerError(f"{other.model_path}: changed on disk while in use (sha256 {other.sha256[:16]}...)")
        self.__dict__.update(other.__dict__)

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"
