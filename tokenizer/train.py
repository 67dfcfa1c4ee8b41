"""Train a SentencePiece model from Pile-format shards (`hgrn-tokenizer train`).

Documents are streamed out of the shards round-robin (one from each shard in turn) until the document or
character budget is met, so the sample is spread evenly over shards without reading any shard whole. Each
document is fed to SentencePiece line by line. The options make every UTF-8 text round-trip exactly:
identity normalisation, no whitespace folding, no dummy prefix, byte fallback for anything outside the pieces;
digits are split (one piece per digit, as in LLaMA, Touvron et al. 2023, section 2.1).
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import sentencepiece as spm
from tqdm import tqdm

from hgrn_megatron.corpus.counters import DataCounters
from hgrn_megatron.corpus.records import RecordFormat, RecordParser, SkipWarner, iter_documents
from hgrn_megatron.corpus.shards import resolve_shards, shard_display_names

from .config import TokenizerTrainConfig
from .model import (
    METADATA_FILE,
    METADATA_FORMAT,
    MODEL_FILE,
    SPECIAL_IDS,
    VOCAB_FILE,
    Tokenizer,
    TokenizerError,
    sha256_file,
)

log = logging.getLogger(__name__)


def sample_documents(
    paths: Sequence[Path],
    names: Sequence[str],
    cfg: TokenizerTrainConfig,
    counters: DataCounters,
    progress: bool = True,
) -> Iterator[tuple[str, str]]:
    """Yield (text, source) round-robin over shards until `sample_documents` / `sample_chars` is reached."""
    parser = RecordParser(RecordFormat(text_field=cfg.text_field))
    warner = SkipWarner()
    streams = [
        iter_documents(p, parser, shard_name=n, counters=counters, warner=warner) for p, n in zip(paths, names)
    ]
    docs = chars = 0
    by_chars = cfg.sample_chars is not None
    bar = tqdm(
        total=cfg.sample_chars if by_chars else cfg.sample_documents,
        unit="char" if by_chars else "doc", unit_scale=True, desc="sampling documents", disable=not progress,
    )
    with bar:
        while streams:
            for stream in list(streams):
                item = next(stream, None)
                if item is None:
                    streams.remove(stream)
                    continue
                doc = item[1]
                yield doc.text, doc.source
                docs += 1
                chars += len(doc.text)
                bar.update(len(doc.text) if by_chars else 1)
                if (cfg.sample_documents and docs >= cfg.sample_documents) or (by_chars and chars >= cfg.sample_chars):
                    return


def _training_lines(texts: Iterator[tuple[str, str]], max_bytes: int, stats: Counter) -> Iterator[str]:
    for text, source in texts:
        stats["documents"] += 1
        stats["chars"] += len(text)
        stats[f"source:{source}"] += 1
        for line in text.split("\n"):
            if not line:
                continue
            data = line.encode("utf-8")
            if len(data) <= max_bytes:
                yield line
                continue
            # Cut over-long lines (minified code, tables) into pieces of <= max_bytes, each ending on a
            # character boundary, rather than losing them (or the characters a blind byte cut would split).
            start = 0
            while start < len(data):
                end = min(start + max_bytes, len(data))
                while start < end < len(data) and data[end] & 0xC0 == 0x80:  # inside a multi-byte character
                    end -= 1
                if end == start:  # one character longer than max_bytes (max_bytes < 4): keep it whole
                    end += 1
                    while end < len(data) and data[end] & 0xC0 == 0x80:
                        end += 1
                yield data[start:end].decode("utf-8")
                start = end


def _train_sentencepiece(lines: Iterator[str], prefix: str, cfg: TokenizerTrainConfig) -> None:
    """SentencePiece with this project's fixed settings (byte fallback, split digits, no normalisation, the
    special ids of `SPECIAL_IDS`); writes PREFIX.model and PREFIX.vocab."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_prefix=prefix,
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        character_coverage=cfg.character_coverage,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        max_sentence_length=cfg.max_sentence_length,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=cfg.num_threads,
        unk_id=SPECIAL_IDS["unk"],
        bos_id=SPECIAL_IDS["bos"],
        eos_id=SPECIAL_IDS["eos"],
        pad_id=SPECIAL_IDS["pad"],
        minloglevel=2,
    )


def train_tokenizer(
    shards: Sequence[str],
    out_dir: str | Path,
    cfg: TokenizerTrainConfig | None = None,
    *,
    progress: bool = True,
    **options,
) -> Tokenizer:
    """Train a SentencePiece model on documents sampled from `shards`; write DIR/tokenizer.{model,vocab,meta.json}.

    Give either `cfg` or `options` (`TokenizerTrainConfig` fields: vocab_size, model_type, sample_documents,
    sample_chars, ...). The files appear together at the end (written in a temporary directory, then moved
    into place). Raises TokenizerError naming the problem for an unusable sample or output path.
    """
    if cfg is not None and options:
        raise TypeError(f"train_tokenizer: pass either cfg or options, not both (got options {sorted(options)})")
    cfg = cfg or TokenizerTrainConfig.build(options, where="tokenizer.train")
    paths = resolve_shards(shards, field="--shards")
    names = shard_display_names(paths)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TokenizerError(f"--out {out_dir}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    counters = DataCounters()
    stats: Counter = Counter()
    started = time.time()
    lines = _training_lines(sample_documents(paths, names, cfg, counters, progress), cfg.max_sentence_length, stats)
    first = next(lines, None)  # SentencePiece reports an empty corpus as a failed internal check
    if first is None:
        raise TokenizerError(f"--shards: no usable documents (a non-empty '{cfg.text_field}') in the "
                             f"{len(paths)} shards {names[:3]}{' ...' if len(names) > 3 else ''}; skipped "
                             f"records: {counters.summary()['skipped_by_kind'] or 'none'}")
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".train-") as tmp:
        prefix = os.path.join(tmp, "tokenizer")
        try:
            _train_sentencepiece(itertools.chain([first], lines), prefix, cfg)
        except RuntimeError as err:  # e.g. a vocab_size the sample cannot fill, or one below its characters
            detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise TokenizerError(f"SentencePiece could not train on this sample with vocab_size "
                                 f"{cfg.vocab_size}: {detail}") from None
        summary = counters.summary()
        metadata = {
            "format": METADATA_FORMAT,
            "model_file": MODEL_FILE,
            "sha256": sha256_file(prefix + ".model"),
            "vocab_size": cfg.vocab_size,
            "special_ids": dict(SPECIAL_IDS),
            "model_type": cfg.model_type,
            "byte_fallback": True,
            "split_digits": True,
            "normalization": "identity",
            "add_dummy_prefix": False,
            "sentencepiece_version": spm.__version__,
            "training": {
                "options": cfg.model_dump(exclude={"num_threads"}),
                "shards": names,
                "documents": stats["documents"],
                "chars": stats["chars"],
                "documents_by_source": {k[7:]: v for k, v in sorted(stats.items()) if k.startswith("source:")},
                "skipped_records": summary["skipped_by_kind"],
                "seconds": round(time.time() - started, 1),
            },
        }
        with open(os.path.join(tmp, METADATA_FILE), "w") as fh:
            json.dump(metadata, fh, indent=1)
        # Metadata last: a reader that sees the metadata file sees the model it describes.
        for name, src in ((MODEL_FILE, prefix + ".model"), (VOCAB_FILE, prefix + ".vocab"), (METADATA_FILE, None)):
            shutil.move(src or os.path.join(tmp, name), out_dir / name)
    log.info(
        "trained a %d-piece %s tokenizer on %d documents (%d chars) in %.0f s -> %s",
        cfg.vocab_size, cfg.model_type, stats["documents"], stats["chars"], time.time() - started, out_dir,
    )
    return Tokenizer.load(out_dir)
