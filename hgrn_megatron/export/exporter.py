"""Checkpoint -> Hugging Face directory: the whole export, written under a temporary name and renamed.

    export_checkpoint("runs/x", "hf/x")                  # newest complete checkpoint of a run
    export_checkpoint("runs/x/checkpoints/step-00000300", "hf/x", dtype="bf16")

Native format: `config.json` (with `auto_map` to the bundled code), `configuration_hgrn.py`,
`modeling_hgrn.py`, `model.safetensors` (or shards plus `model.safetensors.index.json`),
`generation_config.json`, tokenizer files and `README.md` (a model card). fla format: the same without the
code, with fla's config and parameter names.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from hgrn_megatron.export.checkpoint_reader import ExportError, read_checkpoint
from hgrn_megatron.export.convert import check_against_model, hf_config_dict, native_state_dict
from hgrn_megatron.export.fla_format import fla_config_dict, fla_state_dict
from hgrn_megatron.export.tokenizer_files import TokenizerExportError, write_tokenizer_files

HF_FILES = Path(__file__).resolve().parent / "hf_files"
CODE_FILES = ("configuration_hgrn.py", "modeling_hgrn.py")
AUTO_MAP = {
    "AutoConfig": "configuration_hgrn.HGRNConfig",
    "AutoModel": "modeling_hgrn.HGRNModel",
    "AutoModelForCausalLM": "modeling_hgrn.HGRNForCausalLM",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, dtype: str = "fp32", fmt: str = "native",
                      tokenizer: str | Path | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      overwrite: bool = False, log=print) -> Path:
    """Export `checkpoint` (run dir or step dir) to `out`; returns the output directory."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if fmt not in ("native", "fla"):
        raise ExportError(f"--format {fmt}: expected native or fla")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists (pass --overwrite to replace it)")

    contents = read_checkpoint(checkpoint)
    log(f"checkpoint {contents.step_dir} (step {contents.run_state.get('step')}, "
        f"TP {contents.run_state.get('tp_size', 1)}, ZeRO {contents.run_state.get('zero_stage', '?')})")
    tokenizer_path = _tokenizer_path(contents, tokenizer)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        try:
            special = write_tokenizer_files(tokenizer_path, tmp)
        except TokenizerExportError as err:
            raise ExportError(str(err)) from None
        vocab_size, tokenizer_kind = special.pop("vocab_size"), special.pop("kind")
        if contents.run_state.get("vocab_size") not in (None, vocab_size):
            raise ExportError(f"tokenizer {tokenizer_path} has {vocab_size} tokens; the checkpoint was trained "
                              f"with {contents.run_state['vocab_size']}")
        config = hf_config_dict(contents.config["model"], vocab_size, special)
        weights = native_state_dict(contents.state_dict, vocab_size)
        _check_native(config, weights)
        weights = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in weights.items()}
        if fmt == "fla":
            config_json = {**fla_config_dict(config), "torch_dtype": str(DTYPES[dtype]).removeprefix("torch.")}
            weights = fla_state_dict(weights)
        else:
            config_json = _native_config_json(config, dtype)
            for name in CODE_FILES:
                shutil.copyfile(HF_FILES / name, tmp / name)
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(config), indent=2) + "\n")
        write_safetensors(weights, tmp, max_shard_bytes)
        (tmp / "README.md").write_text(model_card(config, contents, fmt, dtype, tokenizer_kind))
        _default_permissions(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out} ({fmt} format, {dtype}, {sum(v.numel() for v in weights.values()):,} parameters)")
    return out


def _default_permissions(directory: Path) -> None:
    """Every file as a plain write would create it (0666 less the umask): safetensors writes through a private
    temporary file (0600), which would leave the weights unreadable to the group the rest is shared with."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _tokenizer_path(contents, override: str | Path | None) -> Path:
    """The SentencePiece model the run trained with (or `override`), checked against the checkpoint's sha256."""
    if override is not None:
        path = Path(override)
    else:
        configured = (contents.config.get("tokenizer") or {}).get("model")
        if not configured:
            raise ExportError(f"{contents.step_dir}/config.yaml names no tokenizer.model; pass --tokenizer")
        path = Path(configured)
    if path.is_dir():
        path = path / "tokenizer.model"
    if not path.is_file():
        raise ExportError(f"tokenizer {path} not found (the run's tokenizer.model; pass --tokenizer PATH)")
    from hgrn_megatron.tokenizer import Tokenizer, TokenizerError

    try:
        loaded = Tokenizer.load(path)  # checks the model file against its metadata
    except TokenizerError as err:
        raise ExportError(f"tokenizer: {err}") from None
    expected = contents.run_state.get("tokenizer_sha256")
    if expected and loaded.sha256 != expected:
        raise ExportError(f"tokenizer {path} (sha256 {loaded.sha256[:12]}...) is not the one this checkpoint was "
                          f"trained with ({expected[:12]}...)")
    return loaded.model_path


def _check_native(config: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
    from hgrn_megatron.export.hf_files.configuration_hgrn import HGRNConfig
    from hgrn_megatron.export.hf_files.modeling_hgrn import HGRNForCausalLM

    with torch.device("meta"):
        model = HGRNForCausalLM(HGRNConfig(**config))
    check_against_model(weights, model)


def _native_config_json(config: dict[str, Any], dtype: str) -> dict[str, Any]:
    from hgrn_megatron.export.hf_files.configuration_hgrn import HGRNConfig

    hf = HGRNConfig(**config)
    hf.auto_map = dict(AUTO_MAP)
    hf.architectures = ["HGRNForCausalLM"]
    data = hf.to_dict()
    data["torch_dtype"] = data["dtype"] = str(DTYPES[dtype]).removeprefix("torch.")
    return data


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    return {**ids, "use_cache": True}


def write_safetensors(weights: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> list[str]:
    """`model.safetensors`, or `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`
    (transformers' layout) when the weights exceed `max_shard_bytes`."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(weights):
        nbytes = weights[name].numel() * weights[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = weights[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(out / name), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(v.numel() * v.element_size() for v in weights.values())},
        "weight_map": {k: name for name, shard in zip(names, shards) for k in shard},
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def model_card(config: dict[str, Any], contents, fmt: str, dtype: str, tokenizer_kind: str = "fast") -> str:
    rs = contents.run_state
    val = rs.get("last_val_loss")
    tokens = rs.get("consumed_tokens")
    rows = [("step", rs.get("step")), ("tokens trained", f"{tokens:,}" if isinstance(tokens, int) else tokens),
            ("last validation loss", f"{val:.4f}" if isinstance(val, (int, float)) else "not evaluated"),
            ("trained at", f"TP {rs.get('tp_size', 1)}, ZeRO {rs.get('zero_stage', '?')}"),
            ("exported as", f"{fmt} format, {dtype}")]
    cfg_rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in config.items())
    # A fast tokenizer loads with the stock class; AutoTokenizer would read config.json first, whose auto_map
    # (the model's code) makes transformers ask about remote code even for a stock tokenizer.
    load_tokenizer = ("AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)" if tokenizer_kind == "sentencepiece"
                      else "PreTrainedTokenizerFast.from_pretrained(PATH)")
    tokenizer_class = "AutoTokenizer" if tokenizer_kind == "sentencepiece" else "PreTrainedTokenizerFast"
    if fmt == "native":
        usage = (f"```python\nfrom transformers import AutoModelForCausalLM, {tokenizer_class}\n"
                 f"tok = {load_tokenizer}\n"
                 "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)\n"
                 "ids = tok(\"Once upon a time\", return_tensors=\"pt\").input_ids\n"
                 "print(tok.decode(model.generate(ids, max_new_tokens=32)[0], skip_special_tokens=True))\n```\n")
    else:
        usage = ("fla's HGRN runs its fused Triton kernels, so it needs a CUDA GPU (on CPU only with the fused "
                 "ops replaced, as hgrn-megatron's tests do).\n\n"
                 "```python\nimport fla  # registers fla's HGRN with transformers\n"
                 f"from transformers import AutoModelForCausalLM, {tokenizer_class}\n"
                 f"tok = {load_tokenizer}\n"
                 "model = AutoModelForCausalLM.from_pretrained(PATH).cuda()\n```\n")
    return (
        "# HGRN language model\n\n"
        "A Hierarchically Gated Recurrent Network (Qin et al., NeurIPS 2023) language model trained with "
        "hgrn-megatron and exported by `hgrn-export-hf`.\n\n## Training\n\n| | |\n|---|---|\n"
        + "\n".join(f"| {k} | {v} |" for k, v in rows)
        + "\n\n## Configuration\n\n| field | value |\n|---|---|\n" + cfg_rows + "\n\n## Usage\n\n" + usage
    )
