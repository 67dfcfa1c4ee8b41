"""Loss and perplexity, overall and per source, of a checkpoint on any Pile-format shards.

The samples are the trainer's validation samples (`pretrain.data.build_validation_batches`: documents + EOS,
packed to seq_length + 1 tokens, document starts marked) and the loss is the trainer's own validation
(`pretrain.evaluation.evaluate`) on the native megatron model at TP 1 in one process, with the checkpoint's
TP-merged fp32 weights. Given the run's validation shards, sample count and micro-batch size, the numbers are
the `val_loss` the trainer logged for that checkpoint (fp32 runs; a bf16 run's trainer evaluated in bf16).
The attention baseline is evaluated the same way (it has no Hugging Face export).

`shard_loss` sets up (and tears down) a one-process gloo group and megatron's parallel state. megatron keeps
state past its teardown that makes gloo ranks forked afterwards from the same process hang, so a process that
forks ranks later (a test session) should run it in a subprocess, as `hgrn-eval` does by being one.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .hf_model import EvaluationError


class _PlainEngine:
    """What `evaluate` asks of a DeepSpeed engine, answered by a bare module (no ZeRO, one process)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.device = next(module.parameters()).device

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def eval(self):
        self.module.eval()

    def train(self):
        pass  # evaluation only: the module stays in eval mode

    def zero_optimization_stage(self) -> int:
        return 0


def _tokenizer(contents, override: str | Path | None):
    from hgrn_megatron.tokenizer import Tokenizer, TokenizerError

    path = override or (contents.config.get("tokenizer") or {}).get("model")
    if not path:
        raise EvaluationError(f"{contents.step_dir}/config.yaml names no tokenizer.model; pass --tokenizer")
    try:
        tok = Tokenizer.load(path)
    except TokenizerError as err:
        raise EvaluationError(f"tokenizer: {err}") from None
    expected = contents.run_state.get("tokenizer_sha256")
    if expected and tok.sha256 != expected:
        raise EvaluationError(f"tokenizer {tok.model_path} is not the one this checkpoint was trained with")
    return tok


def _data_config(contents, shards: list[str], samples: int | None):
    from hgrn_megatron.pretrain.data import DataConfig, DataError

    section = dict(contents.config.get("data") or {})
    tree = {"train_shards": section.get("train_shards") or shards, "valid_shards": shards,
            "valid_samples": samples if samples is not None else section.get("valid_samples", 64)}
    for key in ("text_field", "source_field"):
        if key in section:
            tree[key] = section[key]
    cfg = DataConfig.build(tree, where="data")
    try:
        cfg.resolve_valid()
    except DataError as err:
        raise EvaluationError(f"--shards: {err}") from None
    return cfg


def shard_loss(checkpoint: str | Path, shards: list[str], *, samples: int | None = None,
               micro_batch_size: int | None = None, tokenizer: str | Path | None = None) -> dict:
    """{"val_loss", "val_ppl", "val_tokens", "val_loss/<source>", "val_ppl/<source>", "samples", "step"}."""
    from hgrn_megatron.config import ModelConfig
    from hgrn_megatron.export.checkpoint_reader import ExportError, read_checkpoint
    from hgrn_megatron.pretrain.data import build_validation_batches

    try:
        contents = read_checkpoint(checkpoint)
    except ExportError as err:
        raise EvaluationError(str(err)) from None
    model_cfg = ModelConfig.build(contents.config["model"], where="model")
    data_cfg = _data_config(contents, shards, samples)
    mb = micro_batch_size or (contents.config.get("train") or {}).get("micro_batch_size", 8)
    val = build_validation_batches(data_cfg, _tokenizer(contents, tokenizer), model_cfg.seq_length, mb)
    if not val["batches"]:
        raise EvaluationError(f"--shards {' '.join(shards)}: no complete sample of {model_cfg.seq_length + 1} "
                              "tokens in these shards")
    out = _native_validation(model_cfg, contents.state_dict, val)
    for key in [k for k in out if k.startswith("val_loss/")]:
        out["val_ppl/" + key.split("/", 1)[1]] = math.exp(min(out[key], 50.0))
    return {**out, "samples": val["samples"], "step": contents.run_state.get("step"),
            "checkpoint": str(contents.step_dir)}


def _native_validation(model_cfg, state_dict: dict, val: dict) -> dict:
    from hgrn_megatron.model import build_model, single_process_model_parallel
    from hgrn_megatron.pretrain.evaluation import evaluate

    padded_rows = state_dict["embedding.word_embeddings.weight"].shape[0]
    with single_process_model_parallel():
        model = build_model(model_cfg, padded_rows)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise EvaluationError(f"checkpoint weights do not fit model config: missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}")
        return evaluate(_PlainEngine(model), val["batches"], val["source_names"], dp_group=None)
