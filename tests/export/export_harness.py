"""Shared pieces of the export tests: real checkpoints written by DeepSpeed around the native megatron model,
and the native model's reference outputs on fixed tokens.

Rank functions run in processes forked by `run_distributed`, so they live at module level and return only
picklable values.
"""
from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
import torch
import yaml

from hgrn_megatron.pretrain.data import model_inputs

REPO = Path(__file__).resolve().parents[2]
TEXT_SHARD_DIRS = [REPO / "tests" / "assets" / "pile-mini", REPO.parent / "shared" / "data" / "pile-sample"]
EOS_ID = 2  # the framework's fixed special ids: unk 0, bos 1, eos 2, pad 3


def text_shards() -> list[str]:
    """Pile-format shards for tokenizer training and sample text (the shipped sample first)."""
    for folder in TEXT_SHARD_DIRS:
        found = sorted(glob.glob(str(folder / "*.jsonl.zst")))
        if found:
            return found
    pytest.skip("no Pile-format text shards (tests/assets/pile-mini is empty)")


def probe_tokens(vocab_size: int, batch: int = 2, length: int = 40, seed: int = 11) -> torch.Tensor:
    """Fixed token ids with an EOS inside every row (a document boundary for models that reset there)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab_size, (batch, length), generator=g)
    ids[:, length // 3] = EOS_ID
    return ids


def doc_starts_after_eos(ids: torch.Tensor) -> torch.Tensor:
    """The data pipeline's document starts for `tokens + EOS` documents: the token after each EOS."""
    start = torch.zeros_like(ids, dtype=torch.bool)
    start[:, 1:] = ids[:, :-1] == EOS_ID
    return start


def _full_logits(model, ids, reset: bool) -> torch.Tensor:
    """Logits over the whole padded vocabulary (gathered from the TP ranks' vocabulary slices)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    logits = model(ids, doc_start=doc_starts_after_eos(ids) if reset else None).contiguous()
    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits, group=group)
    return torch.cat(parts, dim=-1)


def train_and_checkpoint(spec: dict) -> dict | None:
    """Build the native model at TP = spec['tp'] (DP = world / TP), wrap it in DeepSpeed at ZeRO
    spec['zero'], train spec['steps'] steps on random tokens, save a framework checkpoint into
    spec['run_dir'] and return (rank 0) the native model's logits, per-token loss and greedy continuation."""
    import deepspeed
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from hgrn_megatron.config import ModelConfig
    from hgrn_megatron.model import build_model
    from hgrn_megatron.pretrain.checkpoint import RetentionPolicy, save_checkpoint
    from hgrn_megatron.pretrain.distributed import MegatronMpu, init_model_parallel
    from hgrn_megatron.tokenizer import padded_vocab_size

    tp, zero, vocab = spec["tp"], spec["zero"], spec["vocab_size"]
    init_model_parallel(tp)
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    cfg = ModelConfig.build({"preset": "tiny", **spec["model"]})
    padded = padded_vocab_size(vocab, tp)
    torch.manual_seed(0)
    model = build_model(cfg, padded)
    # A large learning rate moves every parameter (θ, lower bounds, norms) well away from its initial value.
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    micro = 2
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, mpu=MegatronMpu(), dist_init_required=False,
        config={"train_batch_size": micro * dp, "train_micro_batch_size_per_gpu": micro,
                "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                "zero_optimization": {"stage": zero}, "zero_allow_untested_optimizer": True,
                "bf16": {"enabled": False}, "steps_per_print": 10**9},
    )
    reset = cfg.reset_at_document_boundary
    for step in range(spec["steps"]):
        g = torch.Generator().manual_seed(1000 * step + dp_rank)
        tokens = torch.randint(4, vocab, (micro, 33), generator=g)
        tokens[:, 10] = EOS_ID
        x = model_inputs(tokens)
        loss = engine(x.input_ids, labels=x.labels, doc_start=doc_starts_after_eos(x.input_ids) if reset else None)
        engine.backward(loss.mean())
        engine.step()

    run_dir = Path(spec["run_dir"])
    run_state = {"step": spec["steps"], "consumed_samples": spec["steps"] * micro * dp,
                 "consumed_tokens": spec["steps"] * micro * dp * 32, "world_size": dist.get_world_size(),
                 "dp_size": dp, "tp_size": tp, "zero_stage": zero, "tokenizer_sha256": spec["tokenizer_sha256"],
                 "vocab_size": vocab, "padded_vocab_size": padded, "skipped_steps": 0, "last_val_loss": 4.321}
    config_yaml = yaml.safe_dump({"run_dir": str(run_dir), "model": cfg.model_dump(mode="json"),
                                  "tokenizer": {"model": spec["tokenizer_dir"]}}, sort_keys=False)
    save_checkpoint(engine, run_dir / "checkpoints", spec["steps"], run_state, {}, config_yaml,
                    RetentionPolicy(keep_last=2))

    engine.eval()
    ids = probe_tokens(vocab)
    with torch.no_grad():
        logits = _full_logits(engine.module, ids, reset)[..., :vocab]
        labels = torch.roll(ids, -1, dims=1)
        per_token_loss = engine.module(ids, labels=labels, doc_start=doc_starts_after_eos(ids) if reset else None)
        greedy = ids[:1, :12]
        for _ in range(spec.get("greedy_tokens", 8)):
            nxt = _full_logits(engine.module, greedy, reset)[:, -1, :vocab].argmax(-1, keepdim=True)
            greedy = torch.cat([greedy, nxt], dim=1)
    if dist.get_rank() != 0:
        return None
    return {"ids": ids, "logits": logits.float(), "per_token_loss": per_token_loss.float(), "greedy": greedy}


def native_reference(spec: dict) -> dict:
    """Write the checkpoint described by `spec` on `tp * dp` gloo ranks; rank 0's reference outputs."""
    from hgrn_megatron.testing.distributed import run_distributed

    return run_distributed(train_and_checkpoint, world_size=spec["tp"] * spec["dp"], args=(spec,), timeout=300,
                           threads_per_rank=1)[0]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()


def mean_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over positions of KL(softmax p || softmax q), in float64."""
    p = torch.log_softmax(p_logits.double(), -1)
    q = torch.log_softmax(q_logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def write_module_checkpoint(spec: dict) -> dict:
    """A checkpoint in the framework's layout without DeepSpeed's optimizer shards (as ZeRO 0 writes it): the
    native TP = 1 model's state dict under `module` in `ds/mp_rank_00_model_states.pt`. Returns the native
    model's logits on `probe_tokens`. Runs on one gloo rank (megatron needs a process group)."""
    from hgrn_megatron.config import ModelConfig
    from hgrn_megatron.model import build_model
    from hgrn_megatron.pretrain.checkpoint import atomic_write_bytes, step_dir_name, write_manifest
    from hgrn_megatron.pretrain.distributed import init_model_parallel
    from hgrn_megatron.tokenizer import padded_vocab_size

    init_model_parallel(1)
    vocab = spec["vocab_size"]
    cfg = ModelConfig.build({"preset": "tiny", **spec["model"]})
    torch.manual_seed(spec.get("seed", 0))
    model = build_model(cfg, padded_vocab_size(vocab, 1))
    with torch.no_grad():  # move every parameter off its initial value (θ, lower bounds and norms included)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    step_dir = Path(spec["run_dir"]) / "checkpoints" / step_dir_name(5)
    (step_dir / "ds").mkdir(parents=True)
    torch.save({"module": model.state_dict()}, step_dir / "ds" / "mp_rank_00_model_states.pt")
    run_state = {"step": 5, "consumed_samples": 40, "consumed_tokens": 1280, "tp_size": 1, "dp_size": 1,
                 "zero_stage": 0, "tokenizer_sha256": spec["tokenizer_sha256"], "vocab_size": vocab,
                 "last_val_loss": None}
    atomic_write_bytes(step_dir / "run_state.json", json.dumps(run_state).encode())
    config = {"model": cfg.model_dump(mode="json"), "tokenizer": {"model": spec["tokenizer_dir"]}}
    atomic_write_bytes(step_dir / "config.yaml", yaml.safe_dump(config).encode())
    write_manifest(step_dir)
    model.eval()
    ids = probe_tokens(vocab)
    with torch.no_grad():
        logits = _full_logits(model, ids, cfg.reset_at_document_boundary)[..., :vocab]
    return {"ids": ids, "logits": logits.float()}


def module_checkpoint(spec: dict) -> dict:
    from hgrn_megatron.testing.distributed import run_distributed

    # One thread: a forked child whose parent already ran multi-threaded torch ops can deadlock in its first
    # OpenMP region (GNU libgomp is not fork-safe).
    return run_distributed(write_module_checkpoint, world_size=1, args=(spec,), timeout=120, threads_per_rank=1)[0]
