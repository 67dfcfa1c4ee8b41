"""The fla format: a directory that flash-linear-attention's `HGRNForCausalLM` loads (`import fla` first).

fla's HGRN (fla/models/hgrn, fla/layers/hgrn.py) is the real-variant HGRU: `i, f, g` projections of width
`expand_ratio * d`, `log lambda = logaddexp(log gamma, log(1 - gamma) + logsigmoid(f))` with the same
lower-bound table (softmax over layers, cumsum minus the first row, layer 0 unbounded), input
`silu(i) * (1 - lambda)`, output `o_proj(RMSNorm(h) * silu(g))`, RMSNorm pre-norm blocks and a SwiGLU MLP,
no biases, one epsilon for every norm. Settings outside that set are refused with the reason.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from hgrn_megatron.export.checkpoint_reader import ExportError

# exported (native) name -> fla name
FLA_NAME_MAP: list[tuple[str, str]] = [
    (r"model\.embed_tokens\.weight", "model.embeddings.weight"),
    (r"model\.lower_bounds", "model.lower_bounds"),
    (r"model\.layers\.(\d+)\.input_norm\.weight", "model.layers.{0}.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.mixer\.(i_proj|f_proj|g_proj|o_proj)\.weight", "model.layers.{0}.attn.{1}.weight"),
    (r"model\.layers\.(\d+)\.mixer\.out_norm\.weight", "model.layers.{0}.attn.g_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp_norm\.weight", "model.layers.{0}.mlp_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", "model.layers.{0}.mlp.{1}.weight"),
    (r"model\.norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
]
_COMPILED = [(re.compile(p + r"\Z"), t) for p, t in FLA_NAME_MAP]


def fla_unsupported(hf_config: dict[str, Any]) -> list[str]:
    """Why fla's HGRN cannot express this model (empty when it can)."""
    reasons = []
    if hf_config["variant"] != "real":
        reasons.append("variant=complex (fla's HGRN is the real variant)")
    if not hf_config["output_gate"]:
        reasons.append("output_gate=false (fla always gates the output)")
    if hf_config["mixer_norm"] != "rmsnorm":
        reasons.append(f"mixer_norm={hf_config['mixer_norm']} (fla uses a gated RMSNorm)")
    if hf_config["norm"] != "rmsnorm":
        reasons.append(f"norm={hf_config['norm']} (fla's blocks use RMSNorm)")
    if hf_config["output_gate"] and hf_config.get("output_gate_activation", "silu") != "silu":
        reasons.append(f"output_gate_activation={hf_config['output_gate_activation']} (fla's gate is silu)")
    if hf_config["output_gate"] and hf_config.get("output_gate_placement", "after_norm") != "after_norm":
        reasons.append(f"output_gate_placement={hf_config['output_gate_placement']} (fla gates after its "
                       "norm: RMSNorm(h) * silu(g))")
    if hf_config["mixer_bias"]:
        reasons.append("mixer_bias=true (fla's HGRN projections have no biases; form 'paper' has them)")
    if hf_config["mlp_bias"]:
        reasons.append("add_bias_linear=true (fla's MLP linears have no biases)")
    if float(hf_config["expand_ratio"]) != int(hf_config["expand_ratio"]):
        reasons.append(f"expand_ratio={hf_config['expand_ratio']} is not whole")
    return reasons


def fla_config_dict(hf_config: dict[str, Any]) -> dict[str, Any]:
    """config.json for fla's `HGRNConfig` (model_type "hgrn")."""
    reasons = fla_unsupported(hf_config)
    if reasons:
        raise ExportError("--format fla: fla's HGRN cannot express this model: " + "; ".join(reasons))
    return {
        "model_type": "hgrn",
        "architectures": ["HGRNForCausalLM"],
        "attn_mode": "chunk",
        "vocab_size": hf_config["vocab_size"],
        "hidden_size": hf_config["hidden_size"],
        "num_hidden_layers": hf_config["num_hidden_layers"],
        "expand_ratio": int(hf_config["expand_ratio"]),
        "use_short_conv": False,
        "use_lower_bound": hf_config["use_lower_bound"],
        "intermediate_size": hf_config["intermediate_size"],
        "hidden_act": "swish",
        "elementwise_affine": True,
        "norm_eps": hf_config["norm_epsilon"],
        "tie_word_embeddings": hf_config["tie_word_embeddings"],
        "initializer_range": hf_config["initializer_range"],
        # fla's HGRN is recurrent too: no length limit for generate to cap at and warn about (None)
        "max_position_embeddings": None,
        "bos_token_id": hf_config["bos_token_id"],
        "eos_token_id": hf_config["eos_token_id"],
        "pad_token_id": hf_config["pad_token_id"],
        "use_cache": True,
    }


def fla_state_dict(native: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in native.items():
        for pattern, template in _COMPILED:
            m = pattern.match(name)
            if m:
                out[template.format(*m.groups())] = tensor
                break
        else:
            raise ExportError(f"--format fla: {name} has no fla counterpart")
    return out
