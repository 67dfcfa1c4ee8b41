"""`DataConfig`: the `data` section of the run config."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from hgrn_megatron.config_base import ConfigNode
from hgrn_megatron.corpus.records import DEFAULT_FORMAT, RecordFormat
from hgrn_megatron.corpus.shards import DataError, resolve_shards, shard_display_names


class ShardGroupConfig(ConfigNode):
    shards: list[str] = Field(description="Globs, directories or files of *.jsonl.zst / *.jsonl shards.")
    weight: float = Field(1.0, ge=0, description="Uses of each document per epoch (the Pile's 'epochs'; 0 drops).")


class DataConfig(ConfigNode):
    # ------------------------------------------------------------ where the data is
    train_shards: list[str] = Field(
        [], description="Training shards: globs, directories or files (*.jsonl.zst, *.jsonl), weight 1."
    )
    train_groups: dict[str, ShardGroupConfig] = Field(
        {}, description="Further training shards as named groups with a weight each: {name: {shards, weight}}."
    )
    valid_shards: list[str] = Field([], description="Validation shards (separate from training); [] = none.")
    # The record format: defaults live in `RecordFormat`, and `record_format()` carries these three whole.
    text_field: str = Field(
        DEFAULT_FORMAT.text_field, description="Dotted path of the document text in each JSON record."
    )
    source_field: str = Field(
        DEFAULT_FORMAT.source_field, description="Dotted path of the source name (for mixing/stats)."
    )
    max_document_bytes: int = Field(
        DEFAULT_FORMAT.max_document_bytes, ge=1, description="Longest record (its JSON line, in bytes) that is "
        "read; a longer one is skipped as 'oversized_document' unparsed (one huge document would stall a worker "
        "and take gigabytes of memory)."
    )

    # ------------------------------------------------------------ order and mixture
    source_weights: dict[str, float] = Field(
        {}, description="Uses per epoch of each source's documents, e.g. {Wikipedia (en): 3.0}; unlisted = 1."
    )
    lanes: int = Field(
        1024, gt=0, description="Packing lanes; fixed for a run. Keep it a multiple of every data-parallel size used "
        "(each rank then reads only its own lanes); a lane costs about 0.5 MiB in the worker that reads it."
    )
    seed: int = Field(1234, description="Seeds the unit order of every pass and fractional mixture weights.")

    # ------------------------------------------------------------ background loading
    num_workers: int = Field(1, ge=0, description="Loader processes per rank; 0 = load in the training process.")
    prefetch: int = Field(32, gt=0, description="Samples each worker may have ready ahead of the trainer.")
    worker_start_method: Literal["fork", "spawn", "forkserver"] = Field(
        "fork", description="How worker processes start (fork: fastest; spawn: safest with threads)."
    )

    # ------------------------------------------------------------ validation and reporting
    valid_samples: int = Field(64, ge=0, description="Validation samples (seq_length + 1 tokens each), all ranks.")
    warn_limit: int = Field(5, ge=0, description="Skipped-record warnings per (shard, kind) before thinning out.")

    @model_validator(mode="after")
    def _needs_training_data(self) -> DataConfig:
        if not self.train_shards and not self.train_groups:
            raise ValueError("set data.train_shards (globs) or data.train_groups")
        for name, weight in self.source_weights.items():
            if weight < 0:
                raise ValueError(f"data.source_weights.{name}: weight must be >= 0, got {weight}")
        return self

    def record_format(self) -> RecordFormat:
        """How each JSON line becomes a document: built here once, carried whole through the pipeline."""
        return RecordFormat(self.text_field, self.source_field, self.max_document_bytes)

    def resolve_train(self) -> tuple[list[Path], list[str], list[float]]:
        """(paths, display names, weight per shard); DataError for a missing path, an empty glob, a clash."""
        groups: list[tuple[str, list[str], float]] = []
        if self.train_shards:
            groups.append(("data.train_shards", self.train_shards, 1.0))
        for name, group in self.train_groups.items():
            groups.append((f"data.train_groups.{name}.shards", group.shards, group.weight))
        owner: dict[Path, str] = {}
        weights: dict[Path, float] = {}
        for field, patterns, weight in groups:
            for path in resolve_shards(patterns, field=field):
                if path in owner:
                    raise DataError(f"{field}: shard {path} is also listed in {owner[path]}")
                owner[path] = field
                weights[path] = weight
        paths = sorted(owner)
        return paths, shard_display_names(paths), [weights[p] for p in paths]

    def resolve_valid(self) -> list[Path]:
        return resolve_shards(self.valid_shards, field="data.valid_shards") if self.valid_shards else []

    def check_paths(self) -> None:
        """Resolve every shard path now: a clear DataError before any training work starts."""
        self.resolve_train()
        self.resolve_valid()
