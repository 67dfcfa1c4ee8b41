"""Tokenizer files of an exported model: the SentencePiece model plus what `AutoTokenizer` needs to encode and
decode exactly like it, proven on write.

Preferred: a `tokenizer.json` built from the SentencePiece model proto by transformers' converter, which follows
the model's own normaliser settings (whitespace handling, dummy prefix, byte fallback); it loads without remote
code. Where that conversion is not exact (a unigram lattice can match control or byte pieces written literally
in text, which SentencePiece never does), the exact fallback is a small tokenizer class that calls
SentencePiece itself. Special-token strings in text are encoded as text, as SentencePiece does
(`split_special_tokens`); no BOS/EOS is added, as the framework's `Tokenizer.encode` adds none.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

PROBE_TEXTS = (
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. 0123456789 3.14159",
    "  leading spaces\n\n\tindented\ttabs   and  runs of spaces  \n",
    "def f(x):\n    return x ** 2  # code keeps its indentation\n",
    "Unicode: café, naïve, Straße, Ελληνικά, русский, 中文, 日本語, 한국어, emoji 😀🚀",
    "Control-like text: <s> </s> <unk> <pad> [CLS] <|endoftext|>",
    "a\u00a0non-breaking space, a\u2009thin space, and\r\nwindows line ends",
    "",
    " ",
    "x" * 300,
)


SENTENCEPIECE_TOKENIZER_FILE = "tokenization_hgrn.py"


class TokenizerExportError(RuntimeError):
    pass


def _special_pieces(sp) -> dict[str, str]:
    """bos/eos/unk/pad token strings of a SentencePiece processor (those it defines)."""
    pieces = {}
    for name, idx in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id()),
                      ("pad_token", sp.pad_id())):
        if idx >= 0:
            pieces[name] = sp.id_to_piece(idx)
    return pieces


def build_fast_tokenizer(model_path: Path):
    """A `tokenizers.Tokenizer` equivalent to the SentencePiece model at `model_path`."""
    try:
        from tokenizers import decoders
        from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf
    except ImportError as err:  # pragma: no cover - depends on the installed transformers
        raise TokenizerExportError(f"transformers cannot convert SentencePiece models here ({err})") from None
    if not hasattr(SpmConverter, "build_tokenizer_from_spm_proto"):  # pragma: no cover
        raise TokenizerExportError("this transformers version cannot build a tokenizer from a SentencePiece proto; "
                                   "upgrade transformers (>= 5) to export tokenizers")
    proto = import_protobuf().ModelProto.FromString(model_path.read_bytes())
    model_type = proto.trainer_spec.model_type  # 1 unigram, 2 BPE
    if model_type == 2:
        vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    elif model_type == 1:
        # SentencePiece never produces control, unknown, unused or byte pieces from text (bytes only as the
        # fallback): give them no chance in the unigram lattice either, or literal "<s>" would become BOS.
        normal = (1, 4)  # NORMAL, USER_DEFINED
        vocab = [(piece.piece, piece.score if piece.type in normal else -1e9) for piece in proto.pieces]
    else:
        raise TokenizerExportError(f"{model_path}: SentencePiece model type {model_type} (word/char) is not supported; "
                                   "export supports unigram and BPE models")
    tokenizer = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    if tokenizer is None:  # pragma: no cover
        raise TokenizerExportError(f"{model_path}: transformers could not convert this SentencePiece model")
    unk_surface = proto.trainer_spec.unk_surface or " \u2047 "
    if proto.trainer_spec.unk_id >= 0:
        # SentencePiece writes an unknown token as its `unk_surface` (" ⁇ "), not as the piece "<unk>"
        unk_piece = proto.pieces[proto.trainer_spec.unk_id].piece
        tokenizer.decoder = decoders.Sequence([decoders.Replace(unk_piece, unk_surface), tokenizer.decoder])
    return tokenizer


def write_tokenizer_files(model_path: Path, out_dir: Path, *, verify_texts: tuple[str, ...] | list[str] = ()) -> dict:
    """Write the tokenizer files into `out_dir` and prove them against SentencePiece (probe texts,
    `verify_texts`, every single token). Returns the special-token ids, the vocabulary size and `kind`:

    - "fast": `tokenizer.json` + `tokenizer_config.json`; `AutoTokenizer.from_pretrained(DIR)` needs no
      remote code (BPE models, the framework's default);
    - "sentencepiece": when the fast conversion is not exact (unigram models), `tokenization_hgrn.py`, a
      tokenizer that calls SentencePiece itself: `AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)`.
    `tokenizer.model` (the SentencePiece model) is always written.
    """
    import sentencepiece as spm

    model_path = Path(model_path)
    if not model_path.is_file():
        raise TokenizerExportError(f"tokenizer model {model_path} does not exist")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_path))
    except (OSError, RuntimeError) as err:
        raise TokenizerExportError(f"{model_path} is not a SentencePiece model ({err})") from None
    out_dir = Path(out_dir)
    shutil.copyfile(model_path, out_dir / "tokenizer.model")
    specials = _special_pieces(sp)
    common = {**specials, "split_special_tokens": True, "clean_up_tokenization_spaces": False,
              "add_bos_token": False, "add_eos_token": False,
              "padding_side": "left",  # batched generation pads on the left
              "model_max_length": 10**30}  # a recurrent model has no context limit
    texts = list(PROBE_TEXTS) + list(verify_texts)
    try:
        build_fast_tokenizer(model_path).save(str(out_dir / "tokenizer.json"))
        # A plain fast tokenizer: the class exists in every transformers version and needs no remote code.
        _write_json(out_dir / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", **common})
        _write_json(out_dir / "special_tokens_map.json", specials)
        verify_tokenizer(out_dir, sp, texts, remote_code=False)
        kind = "fast"
    except TokenizerExportError as fast_problem:
        (out_dir / "tokenizer.json").unlink(missing_ok=True)
        shutil.copyfile(Path(__file__).resolve().parent / "hf_files" / SENTENCEPIECE_TOKENIZER_FILE,
                        out_dir / SENTENCEPIECE_TOKENIZER_FILE)
        _write_json(out_dir / "tokenizer_config.json", {
            "tokenizer_class": "HGRNTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_hgrn.HGRNTokenizer", None]},
            **common})
        try:
            verify_tokenizer(out_dir, sp, texts, remote_code=True)
        except TokenizerExportError as err:
            raise TokenizerExportError(f"{err} (the fast conversion failed too: {fast_problem})") from None
        kind = "sentencepiece"
    return {"bos_token_id": _id_or_none(sp.bos_id()), "eos_token_id": _id_or_none(sp.eos_id()),
            "pad_token_id": _id_or_none(sp.pad_id()), "unk_token_id": _id_or_none(sp.unk_id()),
            "vocab_size": sp.get_piece_size(), "kind": kind}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _id_or_none(idx: int) -> int | None:
    return idx if idx >= 0 else None


def verify_tokenizer(hf_dir: Path, sp, texts: list[str], *, remote_code: bool) -> None:
    """Raise TokenizerExportError unless `AutoTokenizer.from_pretrained(hf_dir)` encodes every text to the
    SentencePiece ids and decodes those ids (and every single id) to SentencePiece's text."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=remote_code)
    for text in texts:
        ours, theirs = sp.encode(text), hf.encode(text)
        if ours != theirs:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise TokenizerExportError(
                f"exported tokenizer encodes {text[:60]!r} differently from SentencePiece at token {at}: "
                f"{ours[at:at + 5]} vs {theirs[at:at + 5]}")
        if sp.decode(ours) != hf.decode(ours):
            raise TokenizerExportError(f"exported tokenizer decodes the ids of {text[:60]!r} differently: "
                                       f"{hf.decode(ours)[:60]!r} vs {sp.decode(ours)[:60]!r}")
    # Every token's surface, decoded after an ordinary token (a text's first token is checked above: there the
    # dummy-prefix space is dropped). Control tokens decode to "" in SentencePiece and to their piece in
    # transformers unless `skip_special_tokens=True`, so they are left out.
    normal = [i for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or sp.is_byte(i))]
    if not normal:
        return
    anchor = normal[0]
    for i in range(sp.get_piece_size()):
        if sp.is_control(i):
            continue
        ours, theirs = sp.decode([anchor, i]), hf.decode([anchor, i])
        if ours != theirs:
            raise TokenizerExportError(f"exported tokenizer decodes token {i} ({sp.id_to_piece(i)!r}) as "
                                       f"{theirs!r}, SentencePiece as {ours!r} (after token {anchor})")
