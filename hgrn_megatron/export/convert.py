"""Megatron state dict + model config -> the exported model's config and weights (native and fla formats).

The renaming is one declarative table (`NATIVE_NAME_MAP`, megatron regex -> HF template, in the style of
torchtitan's state-dict adapters); the only tensor edits are removing the vocabulary padding and splitting
megatron's fused SwiGLU `linear_fc1` (gate rows first, then up rows, as megatron's `glu` chunks it).
"""
from __future__ import annotations

import re
from typing import Any

import torch

from hgrn_megatron.export.checkpoint_reader import ExportError
from hgrn_megatron.mixers import MIXERS

# megatron name (TP-merged, layer index as group 1) -> exported name; None drops the entry.
NATIVE_NAME_MAP: list[tuple[str, str | None]] = [
    (r"embedding\.word_embeddings\.weight", "model.embed_tokens.weight"),
    (r"lower_bounds\.table", "model.lower_bounds"),
    (r"decoder\.layers\.(\d+)\.input_layernorm\.(weight|bias)", "model.layers.{0}.input_norm.{1}"),
    (r"decoder\.layers\.(\d+)\.self_attention\.linear_in\.(weight|bias)", "model.layers.{0}.mixer.i_proj.{1}"),
    (r"decoder\.layers\.(\d+)\.self_attention\.linear_forget\.(weight|bias)", "model.layers.{0}.mixer.f_proj.{1}"),
    (r"decoder\.layers\.(\d+)\.self_attention\.linear_gate\.(weight|bias)", "model.layers.{0}.mixer.g_proj.{1}"),
    (r"decoder\.layers\.(\d+)\.self_attention\.linear_out\.(weight|bias)", "model.layers.{0}.mixer.o_proj.{1}"),
    (r"decoder\.layers\.(\d+)\.self_attention\.norm\.(weight|bias)", "model.layers.{0}.mixer.out_norm.{1}"),
    (r"decoder\.layers\.(\d+)\.self_attention\.theta", "model.layers.{0}.mixer.theta"),
    (r"decoder\.layers\.(\d+)\.pre_mlp_layernorm\.(weight|bias)", "model.layers.{0}.mlp_norm.{1}"),
    (r"decoder\.layers\.(\d+)\.mlp\.linear_fc1\.(weight|bias)", "model.layers.{0}.mlp.gate_up.{1}"),  # split below
    (r"decoder\.layers\.(\d+)\.mlp\.linear_fc2\.(weight|bias)", "model.layers.{0}.mlp.down_proj.{1}"),
    (r"decoder\.final_layernorm\.(weight|bias)", "model.norm.{0}"),
    (r"output_layer\.weight", "lm_head.weight"),
    (r".*\._extra_state", None),
]
_COMPILED = [(re.compile(pattern + r"\Z"), template) for pattern, template in NATIVE_NAME_MAP]
_VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")


def hf_config_dict(model_cfg: dict[str, Any], vocab_size: int, special_ids: dict[str, int | None]) -> dict[str, Any]:
    """`HGRNConfig` keyword arguments for a framework `ModelConfig` (as a dict) and the real vocabulary."""
    mixer = model_cfg.get("mixer", "hgrn")
    if mixer not in MIXERS or not MIXERS[mixer].hf_export:
        exportable = ", ".join(name for name, spec in MIXERS.items() if spec.hf_export)
        raise ExportError(f"model.mixer={mixer!r}: only models with mixer {exportable} can be exported "
                          "(this mixer has no exported architecture)")
    return {
        "vocab_size": vocab_size,
        "hidden_size": model_cfg["hidden_size"],
        "num_hidden_layers": model_cfg["num_layers"],
        "intermediate_size": model_cfg["ffn_hidden_size"],
        "variant": model_cfg["variant"],
        "expand_ratio": model_cfg.get("expand_ratio", 1),
        "use_lower_bound": model_cfg["use_lower_bound"],
        "output_gate": model_cfg["output_gate"],
        # Configs saved before these switches existed are the authors' code form.
        "output_gate_activation": model_cfg.get("output_gate_activation", "silu"),
        "output_gate_placement": model_cfg.get("output_gate_placement", "after_norm"),
        "mixer_norm": model_cfg["mixer_norm"],
        "reset_at_document_boundary": model_cfg["reset_at_document_boundary"],
        "norm": model_cfg["norm"],
        "norm_epsilon": model_cfg["norm_epsilon"],
        "mixer_bias": _mixer_bias(model_cfg),
        "mlp_bias": model_cfg.get("add_bias_linear", False),
        "initializer_range": model_cfg.get("init_method_std", 0.02),
        "tie_word_embeddings": model_cfg.get("share_embeddings_and_output_weights", False),
        # No max_position_embeddings: the recurrence has no length limit, and transformers' generate would cap and
        # warn at it (configuration_hgrn.py); the training length is kept as information.
        "training_seq_length": model_cfg.get("seq_length"),
        # "triton" was a training-time requirement; the exported model picks the kernel when it can.
        "scan_backend": "torch" if model_cfg.get("scan_backend") == "torch" else "auto",
        "bos_token_id": special_ids.get("bos_token_id"),
        "eos_token_id": special_ids.get("eos_token_id"),
        "pad_token_id": special_ids.get("pad_token_id"),
    }


def _mixer_bias(model_cfg: dict[str, Any]) -> bool:
    """`mixer_bias`, where None (or a config saved before the switch existed) means `add_bias_linear`."""
    value = model_cfg.get("mixer_bias")
    return bool(model_cfg.get("add_bias_linear", False) if value is None else value)


def native_state_dict(megatron_sd: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Exported (native format) weights from a full megatron state dict; vocabulary rows past `vocab_size`
    (TP/alignment padding) are removed. Raises ExportError on a name the table does not know."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in megatron_sd.items():
        target = _target_name(name)
        if target is None:
            continue
        if target.endswith(("mlp.gate_up.weight", "mlp.gate_up.bias")):
            gate, up = tensor.chunk(2, dim=0)
            kind = target.rsplit(".", 1)[1]
            out[target.replace("gate_up." + kind, "gate_proj." + kind)] = gate
            out[target.replace("gate_up." + kind, "up_proj." + kind)] = up
            continue
        if target in _VOCAB_ROWS:
            if tensor.shape[0] < vocab_size:
                raise ExportError(f"{name} has {tensor.shape[0]} rows, fewer than the tokenizer's {vocab_size} tokens")
            tensor = tensor[:vocab_size]
        out[target] = tensor
    return {k: v.contiguous() for k, v in out.items()}


def _target_name(name: str) -> str | None:
    for pattern, template in _COMPILED:
        m = pattern.match(name)
        if m:
            return None if template is None else template.format(*m.groups())
    raise ExportError(f"checkpoint parameter {name!r} has no exported name (unknown model layout)")


def check_against_model(state: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Every exported tensor must exist in `model` with the same shape, and every model tensor must be
    exported (the tied LM head excepted)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        details = [f"missing {missing}" if missing else "", f"unexpected {unexpected}" if unexpected else "",
                   ", ".join(f"{k}: {tuple(state[k].shape)} vs {expected[k]}" for k in wrong)]
        raise ExportError("exported weights do not fit the exported model: " + "; ".join(d for d in details if d))
