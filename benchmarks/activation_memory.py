"""Expected GPU memory of a run config: activations measured, model and optimizer states counted.

    python benchmarks/activation_memory.py --config configs/hgrn-1b.yaml --world 64
    python benchmarks/activation_memory.py --config configs/hgrn-7b.yaml --world 64 --seq 128
    python benchmarks/activation_memory.py --config configs/hgrn-1b.yaml --world 64 --cuda   # on one GPU

Activations: the model (1 layer, then 2 layers, of the config's shape, bf16, at its TP size on gloo ranks) runs
one forward pass with labels while `torch.autograd.graph.saved_tensors_hooks` records every tensor autograd
keeps for the backward pass (distinct storages, weights excluded). The 2-layer minus 1-layer difference is the
cost of one layer; the rest is embedding, final norm and the loss (the fp32 logits). Everything an HGRN layer
saves is per token, so a short `--seq` measures the same bytes per token as the full length.
This counts what is alive at the end of the forward pass, the peak of a training step to first order; the
allocator's slack, CUDA workspaces and temporaries in the backward come on top (the `mem` column of the
trainer's log is the figure to check).

With `--cuda` (one GPU, TP 1 whatever the config says) the whole model instead runs a forward and backward
pass at the config's micro-batch and full sequence length, and the CUDA allocator's peak above the weights is
reported: the check of the saved-tensor count, Triton scan and backward temporaries included.

States: the ZeRO accounting of Rajbhandari et al. 2020 (§3, "model states"), per GPU with Ψ parameters per TP
rank and N data-parallel ranks: bf16 weights 2Ψ and gradients 2Ψ (÷N from stage 2), fp32 master weights and
Adam moments 12Ψ/N (stage >= 1), plus DeepSpeed's fp32 accumulation buffer 4Ψ when
`data_types.grad_accum_dtype: fp32` at stage 1, and two communication buckets.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hgrn_megatron.pretrain.data import model_inputs
from hgrn_megatron.testing.memory import saved_tensor_bytes

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TRITON_INTERPRET", "1")
GIB = 2**30


def saved_activation_bytes(model_fields: dict, num_layers: int, seq: int, vocab: int, tp: int) -> int:
    """Bytes autograd saves for one sample of `seq` tokens on TP rank 0 (runs on a gloo rank)."""
    import torch
    from megatron.core import parallel_state

    from hgrn_megatron.config import ModelConfig
    from hgrn_megatron.model import build_model

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        cfg = ModelConfig(**{**model_fields, "num_layers": num_layers, "seq_length": seq})
        model = build_model(cfg, vocab, params_dtype=torch.bfloat16)
        torch.manual_seed(0)
        x = model_inputs(torch.randint(0, vocab, (1, seq + 1)))
        _, nbytes = saved_tensor_bytes(lambda: model(x.input_ids, labels=x.labels), model.parameters())
        return nbytes
    finally:
        parallel_state.destroy_model_parallel()


def cuda_peak_bytes(model_fields: dict, micro_batch: int, seq: int, vocab: int) -> tuple[int, int, float]:
    """(saved bytes after the forward pass, allocator peak above the weights, seconds per forward+backward),
    measured on the current GPU with the whole model at TP 1 (needs a one-rank NCCL group)."""
    import time

    import torch
    from megatron.core import parallel_state

    from hgrn_megatron.config import ModelConfig
    from hgrn_megatron.model import build_model

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    try:
        model = build_model(ModelConfig(**model_fields), vocab, params_dtype=torch.bfloat16).cuda()
        x = model_inputs(torch.randint(0, vocab, (micro_batch, seq + 1), device="cuda"))
        for _ in range(2):  # the first pass compiles the Triton kernels
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            weights = torch.cuda.memory_allocated()
            loss = model(x.input_ids, labels=x.labels).mean()
            saved = torch.cuda.memory_allocated() - weights
            loss.backward()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - weights
        start = time.perf_counter()
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            model(x.input_ids, labels=x.labels).mean().backward()
        torch.cuda.synchronize()
        return saved, peak, (time.perf_counter() - start) / 3
    finally:
        parallel_state.destroy_model_parallel()


def state_bytes(params_per_rank: float, dp: int, zero_stage: int, precision: str, fp32_accumulation: bool,
                bucket_elements: float) -> dict[str, float]:
    """Model and optimizer state bytes per GPU (see the module docstring)."""
    psi, n = params_per_rank, dp
    if precision == "fp32":
        parts = {"weights": 4 * psi, "gradients": 4 * psi / (n if zero_stage >= 2 else 1),
                 "adam moments": 8 * psi / (n if zero_stage >= 1 else 1)}
        if zero_stage >= 3:
            parts["weights"] /= n
    else:
        parts = {"weights (bf16)": 2 * psi, "gradients (bf16)": 2 * psi / (n if zero_stage >= 2 else 1),
                 "fp32 master + adam moments": 12 * psi / (n if zero_stage >= 1 else 1)}
        if zero_stage >= 3:
            parts["weights (bf16)"] /= n
        if fp32_accumulation and zero_stage <= 1:
            parts["fp32 gradient accumulation"] = 4 * psi
    bytes_per_element = 4 if precision == "fp32" else 2
    if zero_stage in (1, 2):
        parts["communication buckets"] = 2 * bucket_elements * bytes_per_element
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="run config YAML (configs/*.yaml)")
    parser.add_argument("--world", type=int, required=True, help="GPUs in the run (nodes x GPUs per node)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per measured sample (bytes/token do not depend on it)")
    parser.add_argument("--vocab", type=int, default=None, help="padded vocabulary (default: the config's tokenizer, else 32000)")
    parser.add_argument("--cuda", action="store_true", help="measure the whole model on one GPU (TP 1) instead")
    args = parser.parse_args()

    from hgrn_megatron.runtime_env import configure_environment, patch_for_cpu

    configure_environment()
    patch_for_cpu()
    from hgrn_megatron.flops import count_parameters
    from hgrn_megatron.pretrain.config import load_config
    from hgrn_megatron.testing.distributed import run_distributed

    cfg = load_config(args.config)
    cfg.validate_world(args.world)
    tp = cfg.parallel.tensor_parallel_size
    dp = args.world // tp
    vocab = args.vocab or _tokenizer_vocab(cfg, tp)
    fields = cfg.model.model_dump(exclude={"preset"})

    tokens = cfg.train.micro_batch_size * cfg.model.seq_length
    if args.cuda:
        import torch

        if not torch.cuda.is_available():
            sys.exit("--cuda needs a GPU")
        import torch.distributed as dist

        from hgrn_megatron.testing.distributed import free_port

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group("nccl", rank=0, world_size=1)  # megatron's TP collectives run even at TP 1
        saved, peak, seconds = cuda_peak_bytes(fields, cfg.train.micro_batch_size, cfg.model.seq_length, vocab)
        dist.destroy_process_group()
        print(f"{args.config} on {torch.cuda.get_device_name()}, TP 1: micro-batch {cfg.train.micro_batch_size} x "
              f"{cfg.model.seq_length} tokens: {saved / GIB:.1f} GiB saved by the forward pass, peak "
              f"{peak / GIB:.1f} GiB above the weights; {seconds * 1e3:.0f} ms per forward+backward "
              f"({tokens / seconds:,.0f} tokens/s)")
        return
    one, two = (
        run_distributed(saved_activation_bytes, world_size=tp, args=(fields, layers, args.seq, vocab, tp), timeout=1800)[0]
        for layers in (1, 2)
    )
    per_layer, outside = (two - one) / args.seq, (2 * one - two) / args.seq
    activations = tokens * (cfg.model.num_layers * per_layer + outside)

    zero = cfg.deepspeed_config(dp).get("zero_optimization", {})
    data_types = cfg.deepspeed_config(dp).get("data_types", {})
    buckets = float(zero.get("reduce_bucket_size", 5e8))
    params = count_parameters(cfg.model, vocab)
    states = state_bytes(params / tp, dp, cfg.parallel.zero_stage, cfg.train.precision,
                         data_types.get("grad_accum_dtype") == "fp32", buckets)

    print(f"{args.config}: {params / 1e9:.3f} B parameters, vocab {vocab}, world {args.world} = TP {tp} x DP {dp}, "
          f"ZeRO {cfg.parallel.zero_stage}, {cfg.train.precision}")
    print(f"activations: {per_layer / 1024:.1f} KiB per token per layer, {outside / 1024:.1f} KiB per token outside "
          f"the layers -> {cfg.model.num_layers} layers x {tokens} tokens (micro-batch {cfg.train.micro_batch_size} "
          f"x {cfg.model.seq_length}) = {activations / GIB:.1f} GiB")
    for name, value in states.items():
        print(f"{name:>28}: {value / GIB:6.2f} GiB")
    total = activations + sum(states.values())
    print(f"{'total (before allocator slack)':>28}: {total / GIB:6.1f} GiB per GPU")


def _tokenizer_vocab(cfg, tp: int) -> int:
    from hgrn_megatron.tokenizer import Tokenizer, padded_vocab_size

    try:
        return padded_vocab_size(Tokenizer.load(cfg.tokenizer.model).vocab_size, tp)
    except Exception as err:  # noqa: BLE001 - the tokenizer is usually trained later, on the cluster
        print(f"(tokenizer {cfg.tokenizer.model} not readable: {err}; assuming a 32000-piece vocabulary)", file=sys.stderr)
        return padded_vocab_size(32000, tp)


if __name__ == "__main__":
    main()
