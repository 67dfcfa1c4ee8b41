"""The exported Hugging Face model as a `StatefulLM`, and its tokenizer with the framework tokenizer's interface.

A checkpoint reaches the harness through the exporter (`export_to_temporary`): the harness then scores the
very model a user downloads, with its recurrent-state cache (`HGRNCache`), and any TP / ZeRO layout is merged
without a process group.
"""
from __future__ import annotations

import contextlib
import copy
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from hgrn_megatron.harness.scoring import StatefulLM


class EvaluationError(RuntimeError):
    """Bad input to hgrn-eval, as one readable message (exit code 2)."""


class HFTokenizer:
    """`encode` / `decode` / `eos_id` / `vocab_size`, as `hgrn_megatron.tokenizer.Tokenizer` offers them, over the
    exported tokenizer (no BOS/EOS added, as in training)."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def stateful_hf_model(model) -> StatefulLM:
    """Wrap an exported `HGRNForCausalLM`: its `HGRNCache` is the state."""

    device = next(model.parameters()).device

    def forward(input_ids, attention_mask, state):
        mask = None if attention_mask is None else attention_mask.to(device)
        out = model(input_ids.to(device), attention_mask=mask, cache=state, use_cache=True)
        return out.logits, out.cache

    def select_state(cache, rows):
        picked = copy.copy(cache)  # the model writes new states into the cache it is given: never share one
        picked.states = [s.index_select(0, rows.to(s.device)) if s is not None else None for s in cache.states]
        if cache.last_token_was_eos is not None:
            eos = cache.last_token_was_eos
            picked.last_token_was_eos = eos.index_select(0, rows.to(eos.device))
        return picked

    return StatefulLM(forward=forward, select_state=select_state, vocab_size=model.config.vocab_size)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise EvaluationError(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None


def load_hf_dir(path: str | Path, dtype: str = "fp32", device: str = "cpu"):
    """(model in eval mode on `device`, HFTokenizer) from an exported directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise EvaluationError(f"--hf {path}: not an exported model directory (no config.json)")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch_dtype)
    model = model.to(resolve_device(device)).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    return model, HFTokenizer(tokenizer)


@contextlib.contextmanager
def export_to_temporary(checkpoint: str | Path) -> Iterator[Path]:
    """Export `checkpoint` (run or step folder) to a temporary HF directory, removed on exit."""
    from hgrn_megatron.export.checkpoint_reader import ExportError
    from hgrn_megatron.export.exporter import export_checkpoint

    with tempfile.TemporaryDirectory(prefix="hgrn-eval-") as scratch:
        out = Path(scratch) / "hf"
        try:
            export_checkpoint(checkpoint, out, log=lambda msg: print(msg, file=sys.stderr))
        except ExportError as err:
            raise EvaluationError(str(err)) from None
        yield out
