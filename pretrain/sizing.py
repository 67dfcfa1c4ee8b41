"""Will a run fit, and how long will it take: the memory and time model behind `hgrn-pretrain --dry-run`.

Memory per GPU (bytes), for Ψ parameters per TP shard and N = DP x CP ranks sharing ZeRO's partitions
(the ZeRO paper's accounting, Rajbhandari et al. 2020, section 3; docs/LAUNCH.md, "Sizing"):
- bf16/fp16: weights 2Ψ (stage 3: 2Ψ/N), gradients 2Ψ (stage >= 2: 2Ψ/N), fp32 master weights and the two
  Adam moments 12Ψ/N (stage 0: 12Ψ), an fp32 gradient-accumulation buffer 4Ψ when
  `data_types.grad_accum_dtype: fp32` (4Ψ/N at stage >= 2); fp32: weights 4Ψ, gradients 4Ψ, moments 8Ψ/N;
- DeepSpeed's communication buckets: `reduce_bucket_size` + `allgather_bucket_size` elements of the
  training dtype (default 5e8 each);
- activations: measured bytes per token per layer (below) x the tokens of one micro-batch on this rank
  (micro-batch x seq_length / CP), plus the loss's logits outside the layers;
- CUDA context and allocator slack: 2 GiB (docs/LAUNCH.md measured 1-3 GiB).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

GiB = 2**30

# Activations an HGRN layer saves per token, in bytes per hidden unit, split into what TP divides and what
# every TP rank keeps without sequence parallelism (norm inputs, residuals, the linears' inputs). With
# `parallel.sequence_parallel` TP divides both: at TP 2 each rank then saves exactly half of TP 1's (measured,
# `tests/model/test_sequence_parallel.py`; docs/BENCHMARKS.md).
# Fitted to the CPU counts of docs/LAUNCH.md ("Sizing", 2026-11-28, `benchmarks/activation_memory.py`):
# hgrn-1b at TP 1 saves 148.5 KiB per token per layer (d = 2048: 74.25 B per unit), hgrn-7b at TP 2 183.5 KiB
# (d = 4096: 45.875 B per unit), so split + replicated = 74.25 and split / 2 + replicated = 45.875.
HGRN_SPLIT_BYTES_PER_UNIT = 2 * (74.25 - 45.875)      # 56.75
HGRN_REPLICATED_BYTES_PER_UNIT = 74.25 - HGRN_SPLIT_BYTES_PER_UNIT  # 17.5
# The Transformer baseline with flash attention keeps 1/1.17 of the HGRN's activations per token at the same
# width, also linear in T (docs/BENCHMARKS.md, "HGRN keeps 1.17 x the Transformer's activations per token").
TRANSFORMER_RATIO = 1 / 1.17
CUDA_OVERHEAD_BYTES = 2 * GiB
DEFAULT_BUCKET_ELEMENTS = 5e8


@dataclass
class Layout:
    world: int
    tp: int
    cp: int
    dp: int

    @property
    def zero_ranks(self) -> int:
        return self.dp * self.cp  # ZeRO partitions over the DP x CP group (parameters are replicated over CP)


def layout(cfg, world: int) -> Layout:
    tp, cp = cfg.parallel.tensor_parallel_size, cfg.parallel.context_parallel_size
    return Layout(world, tp, cp, world // (tp * cp))


def state_bytes(cfg, params: int, lay: Layout) -> dict[str, float]:
    """Weights, gradients, optimizer states and buckets per GPU, by name."""
    psi, n, stage = params / lay.tp, lay.zero_ranks, cfg.parallel.zero_stage
    half = cfg.train.precision in ("bf16", "fp16")
    extra = cfg.parallel.deepspeed_extra
    p_bytes = 2 if half else 4
    out = {
        "weights": p_bytes * psi / (n if stage == 3 else 1),
        "gradients": p_bytes * psi / (n if stage >= 2 else 1),
        "optimizer": (12 if half else 8) * psi / (n if stage >= 1 else 1),
    }
    if half and extra.get("data_types", {}).get("grad_accum_dtype") == "fp32":
        out["fp32 grad accumulation"] = 4 * psi / (n if stage >= 2 else 1)
    zero = extra.get("zero_optimization", {})
    buckets = zero.get("reduce_bucket_size", DEFAULT_BUCKET_ELEMENTS) + zero.get("allgather_bucket_size",
                                                                                  DEFAULT_BUCKET_ELEMENTS)
    out["communication buckets"] = p_bytes * buckets if stage >= 1 else 0.0
    return out


def sequence_parallel(cfg, tp: int) -> bool:
    """Sequence parallelism is on (it is a no-op at TP 1)."""
    return bool(cfg.parallel.sequence_parallel) and tp > 1


def layer_bytes_per_token(cfg, tp: int) -> float:
    """Bytes one layer saves per token without recompute (measured figures above)."""
    replicated = HGRN_REPLICATED_BYTES_PER_UNIT / (tp if sequence_parallel(cfg, tp) else 1)
    per_unit = HGRN_SPLIT_BYTES_PER_UNIT / tp + replicated
    if cfg.model.mixer == "attention":
        per_unit *= TRANSFORMER_RATIO
    return per_unit * cfg.model.hidden_size


def layers_bytes_per_token(cfg, tp: int) -> float:
    """All layers' saved bytes per token, with the configured recompute.

    full recompute keeps one input (d values of the activation dtype; with sequence parallelism this rank's
    share of them) per recomputed group and, while one group runs again in the backward pass, that group's full
    activations."""
    m = cfg.model
    full = layer_bytes_per_token(cfg, tp)
    if not m.recompute_granularity:
        return m.num_layers * full
    act = (2 if cfg.train.precision in ("bf16", "fp16") else 4) / (tp if sequence_parallel(cfg, tp) else 1)
    group = m.recompute_num_layers
    if m.recompute_method == "uniform":
        return (m.num_layers // group) * act * m.hidden_size + group * full
    # block: the first `group` layers keep only their input; the others save everything
    return group * act * m.hidden_size + full + (m.num_layers - group) * full


def logits_bytes_per_token(vocab: int, tp: int, chunk_tokens: int | None, tokens: float, hidden: int) -> float:
    """The loss outside the layers, per token: the fp32 logits [vocab / TP] megatron keeps for the backward pass,
    or with the chunked loss (hgrn_megatron/chunked_loss.py) the saved hidden state plus one chunk's fp32 logits
    spread over the micro-batch's tokens."""
    if not chunk_tokens:
        return 4 * vocab / tp
    return 2 * hidden + 4 * vocab / tp * min(chunk_tokens, tokens) / max(tokens, 1)


@dataclass
class Memory:
    states: dict[str, float]
    layers: float
    logits: float
    logits_other: float  # the logits with the other loss option (chunked vs full), for comparison

    @property
    def activations(self) -> float:
        return self.layers + self.logits

    @property
    def total(self) -> float:
        return sum(self.states.values()) + self.activations + CUDA_OVERHEAD_BYTES


def configured_chunk(cfg, tokens: float) -> int | None:
    """The chunk the model uses for a micro-batch of `tokens` tokens: `model.loss_chunk_tokens` when the micro-batch
    holds more tokens than that (HGRNModel's rule), else None (megatron's full logits)."""
    chunk = cfg.model.loss_chunk_tokens
    return chunk if chunk and tokens > chunk else None


def memory(cfg, params: int, vocab: int, lay: Layout, seq_length: int | None = None,
           micro_batch: int | None = None, chunk: int | str | None = "config") -> Memory:
    seq = seq_length or cfg.model.seq_length
    tokens = (micro_batch or cfg.train.micro_batch_size) * seq / lay.cp
    chunk = configured_chunk(cfg, tokens) if chunk == "config" else chunk
    d = cfg.model.hidden_size
    return Memory(
        states=state_bytes(cfg, params, lay),
        layers=tokens * layers_bytes_per_token(cfg, lay.tp),
        logits=tokens * logits_bytes_per_token(vocab, lay.tp, chunk, tokens, d),
        logits_other=tokens * logits_bytes_per_token(vocab, lay.tp, None if chunk else 4096, tokens, d),
    )


def longest_sequence(cfg, params: int, vocab: int, lay: Layout, gpu_bytes: float, multiple: int = 1024,
                     chunk: int | str | None = "config") -> int:
    """The longest seq_length (a multiple of `multiple` x CP) whose memory at micro-batch 1 (one sequence per
    GPU, the long-context setting) fits `gpu_bytes`; 0 if none does."""
    step = multiple * lay.cp
    lo, hi = 0, step
    while memory(cfg, params, vocab, lay, hi, 1, chunk).total <= gpu_bytes and hi < 2**40:
        lo, hi = hi, hi * 2
    while hi - lo > step:  # memory grows monotonically with the length: bisect on multiples of `step`
        mid = (lo + hi) // 2 // step * step
        if memory(cfg, params, vocab, lay, mid, 1, chunk).total <= gpu_bytes:
            lo = mid
        else:
            hi = mid
    return lo


def checkpoint_bytes(cfg, params: int) -> float:
    """A checkpoint holds the weights in the training dtype, fp32 master weights (half precision only) and the
    two Adam moments."""
    return params * (2 + 12 if cfg.train.precision in ("bf16", "fp16") else 12)


def tokens_per_second(flops_per_token: float, world: int, mfu: float, peak_flops: float) -> float:
    """The whole job's tokens/s at `mfu` of each GPU's dense peak (model FLOPs: recompute not counted)."""
    return world * mfu * peak_flops / flops_per_token


def batch_fixes(global_batch: int, micro: int, dp: int, ranks_per_replica: int) -> list[str]:
    """Ways out when global_batch is not a multiple of micro x dp: the nearest global batch sizes, the
    micro-batches that would divide, and the nearest world sizes that divide at this micro-batch."""
    per_pass = micro * dp
    lines = []
    lower = global_batch // per_pass * per_pass
    upper = lower + per_pass
    nearest = [g for g in (lower, upper) if g > 0]
    lines.append("train.global_batch_size=" + " or ".join(str(g) for g in nearest)
                 + f" (multiples of micro-batch {micro} x DP {dp} = {per_pass})")
    micros = [m for m in range(1, micro * 2 + 1) if global_batch % (m * dp) == 0]
    if micros:
        lines.append("train.micro_batch_size=" + " or ".join(map(str, micros)) + f" at DP {dp}")
    dps = [k for k in range(1, global_batch // micro + 1) if global_batch % (micro * k) == 0]
    below = [k for k in dps if k < dp][-1:]
    above = [k for k in dps if k > dp][:1]
    worlds = [f"{k * ranks_per_replica} GPUs (DP {k})" for k in below + above]
    if worlds:
        lines.append(f"at micro-batch {micro}: " + " or ".join(worlds))
    if micro > 1 and global_batch % dp and global_batch >= 1:
        fits = [k for k in range(1, global_batch + 1) if global_batch % k == 0 and k <= dp][-1:]
        lines += [f"at micro-batch 1: {k * ranks_per_replica} GPUs (DP {k})" for k in fits]
    return lines


def nodes(world: int, gpus_per_node: int) -> int:
    return math.ceil(world / gpus_per_node)


@dataclass
class Machine:
    gpu_memory_gib: float = 80.0
    gpus_per_node: int = 8
    mfu: float = 0.45
    peak_flops: float = 989e12  # H100/H200 dense bf16


def _gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


def report(cfg, world: int, params: int, vocab: int, flops_per_token: float, machine: Machine) -> list[str]:
    """The dry run's sizing lines: memory per GPU, the longest sequence that fits, checkpoint, time, warnings."""
    lay = layout(cfg, world)
    mem = memory(cfg, params, vocab, lay)
    states = ", ".join(f"{name} {_gib(b)}" for name, b in mem.states.items())
    chunk = configured_chunk(cfg, cfg.train.micro_batch_size * cfg.model.seq_length / lay.cp)
    if chunk:
        loss_note = f"chunked loss ({chunk} tokens): {_gib(mem.logits)}; full fp32 logits would take "
    else:
        loss_note = f"full fp32 logits: {_gib(mem.logits)}; a chunked loss (4096 tokens) would take "
    loss_note += _gib(mem.logits_other)
    tokens = cfg.train.micro_batch_size * cfg.model.seq_length // lay.cp
    budget = machine.gpu_memory_gib * GiB
    fits = "fits" if mem.total <= budget else "DOES NOT FIT"
    longest = longest_sequence(cfg, params, vocab, lay, budget)
    step_tokens = cfg.train.global_batch_size * cfg.model.seq_length
    rate = tokens_per_second(flops_per_token, world, machine.mfu, machine.peak_flops)
    seconds = cfg.train.steps * step_tokens / rate
    lines = [
        f"memory per GPU (ZeRO {cfg.parallel.zero_stage} over DP x CP = {lay.zero_ranks}, TP shard {lay.tp}): "
        f"{states}",
        f"activations per GPU: layers {_gib(mem.layers)} ({tokens:,} tokens per micro-batch on this rank, "
        f"recompute {cfg.model.recompute_granularity or 'off'}, sequence parallel "
        f"{'on' if sequence_parallel(cfg, lay.tp) else 'off'}); loss {loss_note}",
        f"total per GPU: {_gib(mem.total)} with {_gib(CUDA_OVERHEAD_BYTES)} CUDA context and slack: {fits} "
        f"in {machine.gpu_memory_gib:g} GiB",
        f"longest sequence that fits {machine.gpu_memory_gib:g} GiB at micro-batch 1: "
        f"{longest:,} tokens (CP {lay.cp})",
        f"checkpoint: {checkpoint_bytes(cfg, params) / 1e9:.1f} GB (weights, fp32 master weights, Adam moments)",
        f"time: {rate:,.0f} tokens/s at {100 * machine.mfu:.0f}% MFU of {machine.peak_flops / 1e12:g} TFLOP/s per "
        f"GPU ({rate / world:,.0f} per GPU); {cfg.train.steps:,} steps in {seconds / 3600:,.1f} h; "
        f"{_count(nodes(world, machine.gpus_per_node), 'node')} of {machine.gpus_per_node} GPUs",
    ]
    lanes = cfg.data.lanes
    if lanes % lay.dp:  # also when lanes < DP
        lines.append(f"WARNING: data.lanes ({lanes}) is not a multiple of DP {lay.dp}: ranks share packing lanes "
                     "and each tokenizes more than 1/DP of the text; lanes cannot change on resume, so this is "
                     f"permanent for the run (set data.lanes to a multiple of every DP size it may use, e.g. "
                     f"{_next_multiple(lanes, lay.dp)})")
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _next_multiple(value: int, of: int) -> int:
    return max(of, -(-value // of) * of)


def long_context_table(config_paths: list[str], world: int = 64, vocab: int = 32000, gpu_gib: float = 80.0,
                       cps: tuple[int, ...] = (1, 2, 4, 8)) -> str:
    """The markdown table of docs/LAUNCH.md: the longest trainable sequence (micro-batch 1) per config and CP
    size, without and with full recompute, and with the chunked loss on top (4096-token chunks); the same three
    with sequence parallelism where TP > 1 (a dash at TP 1, where it is a no-op)."""
    from hgrn_megatron.flops import count_parameters
    from hgrn_megatron.tokenizer import padded_vocab_size

    from .config import load_config

    kinds = ("recompute off", "full recompute", "full recompute + chunked loss")
    rows = ["| config | TP | CP | DP | " + " | ".join(kinds) + " | " + " | ".join(f"SP, {k}" for k in kinds) + " |",
            "|---|---|---|---|" + "---|" * 2 * len(kinds)]
    for path in config_paths:
        for cp in cps:
            lay = layout(load_config(path, [f"parallel.context_parallel_size={cp}"]), world)
            padded = padded_vocab_size(vocab, lay.tp)
            cells = []
            for sp in (False, True):
                if sp and lay.tp == 1:
                    cells += ["—"] * len(kinds)
                    continue
                base = [f"parallel.context_parallel_size={cp}", f"parallel.sequence_parallel={sp}"]
                cfg = load_config(path, base)
                recompute = load_config(path, [*base, "model.recompute_granularity=full"])
                params = count_parameters(cfg.model, padded)
                cells += [f"{longest_sequence(c, params, padded, lay, gpu_gib * GiB, chunk=k) // 1024:,} k"
                          for c, k in ((cfg, None), (recompute, None), (recompute, 4096))]
            rows.append(f"| {Path(path).name} | {lay.tp} | {cp} | {lay.dp} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    print(long_context_table(sys.argv[1:] or ["configs/hgrn-1b.yaml", "configs/hgrn-7b.yaml"]))
