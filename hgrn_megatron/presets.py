"""Named model sizes. A preset fills the size fields of `ModelConfig`; any field given explicitly wins, so
`{preset: hgrn-1b, mixer: attention}` is the Transformer baseline of the same shape.

How they were sized (parameter counts from `hgrn_megatron.flops.count_parameters` with a 50,304-token
vocabulary, the GPT-NeoX tokenizer's 50,277 padded to a multiple of 128; `hgrn-model info --preset NAME`
prints them for any vocabulary):
- widths and depths follow the GPT-3 size ladder (Brown et al. 2020, table 2.1) where it fits: 768 x 12,
  1024 x 24, 2560 x 32, 4096 x 32; `hgrn-1b` is d = 2048 with 16 layers like the paper's 1B LM (Qin et al.
  2023, §4.2). An HGRU layer holds 7·d² weights (W_i, W_g: d x 2d; W_f: d x d; W_o: 2d x d) against
  attention's 4·d², so the SwiGLU width `ffn_hidden_size` (a multiple of 128) is what brings each preset to
  its nominal size:
  `hgrn-125m` 127.2 M, `hgrn-350m` 350.6 M (both with tied embeddings, as GPT-3's small models: an untied
  head would be 30 % of the model), `hgrn-1b` 1.079 B (SwiGLU width 2·d per half,
  the reference shape the cluster sizing assumes),
  `hgrn-3b` 2.985 B, `hgrn-7b` 6.990 B (untied from 1B up);
- `num_attention_heads` gives 64-dim heads up to 350M and 128-dim heads from 1B up (baseline only);
- `tiny` is for tests and the CPU quickstart: it builds in milliseconds and trains on two cores.
"""
from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64, num_layers=2, ffn_hidden_size=128, num_attention_heads=4, seq_length=128,
        share_embeddings_and_output_weights=False,
    ),
    "hgrn-125m": dict(
        hidden_size=768, num_layers=12, ffn_hidden_size=1408, num_attention_heads=12, seq_length=2048,
        share_embeddings_and_output_weights=True,
    ),
    "hgrn-350m": dict(
        hidden_size=1024, num_layers=24, ffn_hidden_size=1664, num_attention_heads=16, seq_length=2048,
        share_embeddings_and_output_weights=True,
    ),
    "hgrn-1b": dict(
        hidden_size=2048, num_layers=16, ffn_hidden_size=4096, num_attention_heads=16, seq_length=2048,
        share_embeddings_and_output_weights=False,
    ),
    "hgrn-3b": dict(
        hidden_size=2560, num_layers=32, ffn_hidden_size=5120, num_attention_heads=20, seq_length=2048,
        share_embeddings_and_output_weights=False,
    ),
    "hgrn-7b": dict(
        hidden_size=4096, num_layers=32, ffn_hidden_size=7168, num_attention_heads=32, seq_length=2048,
        share_embeddings_and_output_weights=False,
    ),
}

REFERENCE_VOCAB_SIZE = 50304  # the vocabulary the sizes above were computed with


def get_preset(name: str) -> dict[str, Any]:
    """The ModelConfig fields of preset `name` (a fresh dict, `preset` included); KeyError names the choices."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    return {**PRESETS[name], "preset": name}
