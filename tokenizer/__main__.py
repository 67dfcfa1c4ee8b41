"""`hgrn-tokenizer`: train a SentencePiece tokenizer from shards, or inspect one.

    hgrn-tokenizer train --shards 'data/train/*.jsonl.zst' --out tokenizers/pile-32k --vocab-size 32000
    hgrn-tokenizer info tokenizers/pile-32k [--tp 2]
    hgrn-tokenizer encode tokenizers/pile-32k "some text"
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from hgrn_megatron.config_base import ConfigError
from hgrn_megatron.runtime_env import exit_quietly_on_broken_pipe

from .config import TokenizerTrainConfig
from .model import Tokenizer, TokenizerError, vocab_padding


def _train(args) -> int:
    from .train import train_tokenizer

    options = {
        "vocab_size": args.vocab_size,
        "model_type": args.model_type,
        "sample_documents": args.sample_documents,
        "sample_chars": None if args.sample_chars == 0 else args.sample_chars,
        "text_field": args.text_field,
        "character_coverage": args.character_coverage,
        "max_sentence_length": args.max_sentence_length,
    }
    if args.num_threads:
        options["num_threads"] = args.num_threads
    cfg = TokenizerTrainConfig.build(options, where="hgrn-tokenizer train")
    tok = train_tokenizer(args.shards, args.out, cfg, progress=not args.quiet)
    training = tok.metadata["training"]
    print(f"wrote {tok.model_path} ({tok.vocab_size} pieces, sha256 {tok.sha256[:16]}...) from "
          f"{training['documents']} documents, {training['chars']} characters")
    return 0


def _info(args) -> int:
    tok = Tokenizer.load(args.path)
    info = {
        "model": str(tok.model_path),
        "sha256": tok.sha256,
        "special_ids": {"unk": tok.unk_id, "bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id},
        **vocab_padding(tok.vocab_size, args.tp),
        "training": tok.metadata.get("training", {}),
    }
    print(json.dumps(info, indent=1))
    return 0


def _encode(args) -> int:
    tok = Tokenizer.load(args.path)
    ids = tok.encode(args.text)
    print(json.dumps({"ids": ids, "pieces": [tok.id_to_piece(i) for i in ids]}, ensure_ascii=False))
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hgrn-tokenizer", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    defaults = TokenizerTrainConfig.model_fields
    t = sub.add_parser("train", help="train a SentencePiece model on documents sampled from shards")
    t.add_argument("--shards", nargs="+", required=True, help="globs, directories or files of *.jsonl[.zst]")
    t.add_argument("--out", required=True,
                   help="output directory (tokenizer.model, tokenizer.vocab, tokenizer.meta.json)")
    t.add_argument("--vocab-size", type=int, default=defaults["vocab_size"].default)
    t.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    t.add_argument("--sample-documents", type=int, default=None, help="documents to sample (round-robin over shards)")
    t.add_argument("--sample-chars", type=int, default=defaults["sample_chars"].default,
                   help="characters to sample (round-robin over shards); 0 = no limit")
    t.add_argument("--text-field", default="text")
    t.add_argument("--character-coverage", type=float, default=defaults["character_coverage"].default)
    t.add_argument("--max-sentence-length", type=int, default=defaults["max_sentence_length"].default)
    t.add_argument("--num-threads", type=int, default=None)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(fn=_train)
    i = sub.add_parser("info", help="print a tokenizer's metadata and the vocab padding for a TP size")
    i.add_argument("path")
    i.add_argument("--tp", type=_positive_int, default=1, help="tensor-parallel size the vocabulary is padded for")
    i.set_defaults(fn=_info)
    e = sub.add_parser("encode", help="print the ids and pieces of a text")
    e.add_argument("path")
    e.add_argument("text")
    e.set_defaults(fn=_encode)
    return ap


@exit_quietly_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, TokenizerError) as err:
        print(f"hgrn-tokenizer: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
