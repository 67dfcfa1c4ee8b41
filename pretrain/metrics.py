"""Metrics: one console line, TensorBoard scalars and one `metrics.jsonl` record per logged step (rank 0)."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("hgrn_megatron.pretrain")

# Dense peak FLOP/s per device by precision (vendor datasheets, without sparsity).
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "A10G": {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
}


def device_peak_flops(precision: str) -> float | None:
    """Per-device dense peak for `precision`, or None when the device is unknown (then MFU is not reported)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().upper()
    for key, table in PEAK_FLOPS.items():
        if key in name:
            return table.get(precision)
    return None


def memory_gib() -> float:
    """Peak device memory on GPU; resident set size of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**30


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


# Record keys that are not curves: the run's length and the time left, in metrics.jsonl and the console only.
NOT_PLOTTED = frozenset({"step", "total_steps", "eta_s"})


def scalar_tags(record: dict[str, Any], prefix: str) -> dict[str, float]:
    """The plotted scalars of `record` under `prefix/`, the prefix not repeated: `val_loss/a` -> `val/loss/a`,
    `eval/task/acc` -> `eval/task/acc`."""
    tags = {}
    for key, value in record.items():
        if key in NOT_PLOTTED or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = key[len(prefix) + 1:] if key.startswith((prefix + "_", prefix + "/")) else key
        tags[f"{prefix}/{name}"] = value
    return tags


class MetricsWriter:
    """Rank-0 sink for scalars. `metrics.jsonl` gets one JSON object per call of `write`; TensorBoard and
    Weights & Biases (when configured) get the same scalars."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool, start_step: int = 0,
                 wandb: Any = None, run_config: dict[str, Any] | None = None):
        """`start_step`: the step the run resumes from; what an earlier attempt logged after it is dropped
        (metrics.jsonl rewritten, TensorBoard told to purge later events), so each step appears exactly once.
        `wandb`: a `WandbConfig` (None: off); `run_config`: the resolved config, recorded as the W&B run's config."""
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        self.wandb_run = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)
        if enabled and wandb is not None:
            from .wandb_run import start_wandb_run

            try:
                self.wandb_run = start_wandb_run(run_dir, wandb, run_config or {})
            except Exception as err:  # no login, no network, a wrong entity: a logging sink must not stop training
                log.error("Weights & Biases not started (%s: %s); training goes on, the scalars are in "
                          "metrics.jsonl%s", type(err).__name__, err, " and TensorBoard" if self.tb else "")
        self._truncate_after(start_step)

    def _truncate_after(self, step: int) -> None:
        if not (self.enabled and self.path.is_file()):
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:
                continue  # a line torn by a crash
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        tags = scalar_tags(record, prefix)
        if self.tb is not None:
            for tag, value in tags.items():
                self.tb.add_scalar(tag, value, record["step"])
            self.tb.flush()
        if self.wandb_run is not None:
            # Logged against our own `step` axis, not W&B's internal counter: a resume re-logs the steps after
            # its checkpoint, which W&B's monotonic counter would drop.
            self.wandb_run.log({"step": record["step"], **tags})

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            from .wandb_run import finish_wandb_run

            finish_wandb_run(self.wandb_run)
            self.wandb_run = None


def console_line(r: dict[str, Any]) -> str:
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
    return (
        f"step {r['step']:>7}/{r['total_steps']} | loss {r['loss']:.4f} | lr {r['lr']:.3e} | "
        f"gnorm {r['grad_norm']:.3f} | {r['tokens_per_s']:,.0f} tok/s | MFU {mfu} | "
        f"mem {r['memory_gib']:.2f} GiB | data wait {r['data_wait_pct']:.1f}% | "
        f"skipped {r['skipped_steps']} | ETA {format_duration(r['eta_s'])}"
    )


def data_metrics(loader, dp_group) -> dict:
    """Documents read and bad records skipped (by kind) over all data-parallel ranks, each lane counted once."""
    import torch.distributed as dist

    from .data import SKIP_KINDS
    from .distributed import comm_device

    stats = loader.stats()
    per_lane = torch.from_numpy(loader.lane_counts(SKIP_KINDS)).to(comm_device())
    dist.all_reduce(per_lane, op=dist.ReduceOp.MAX, group=dp_group)
    t = per_lane.sum(dim=0).cpu()
    out = {"data_documents": int(t[0]), "data_skipped_records": int(t[1:].sum())}
    out.update({f"data_skipped/{k}": int(v) for k, v in zip(SKIP_KINDS, t[1:].tolist()) if v})
    # What the pipeline read to get there (bytes from disk, decompressed, lines, documents), summed over replicas.
    io = torch.tensor([float(stats.get(k, 0)) for k in DATA_IO_KEYS], dtype=torch.float64, device=comm_device())
    dist.all_reduce(io, group=dp_group)
    out.update({f"data_{k}": int(v) for k, v in zip(DATA_IO_KEYS, io.cpu().tolist())})
    out["data_loader_tokens_per_s"] = stats.get("loader_tokens_per_s")
    return out


DATA_IO_KEYS = ("read_bytes", "decompressed_bytes", "lines_scanned", "documents_tokenized", "seek_decompressed_bytes")


class StartupTimeline:
    """Seconds per phase of the set-up, from the process start (the imports before the trainer included)."""

    def __init__(self):
        import psutil

        now = time.time()
        self.phases = [("imports", now - psutil.Process().create_time())]
        self._last = now

    def mark(self, phase: str) -> None:
        """End `phase` now (repeated phases add up)."""
        now = time.time()
        self.phases.append((phase, now - self._last))
        self._last = now

    def summary(self) -> str:
        total = sum(seconds for _, seconds in self.phases)
        return " | ".join(f"{name} {seconds:.1f} s" for name, seconds in self.phases) + f" | total {total:.1f} s"
