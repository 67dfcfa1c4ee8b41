"""Process-group set-up for torchrun, srun (SLURM variables) or a single process; megatron TP groups; the mpu
adapter DeepSpeed needs."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun" | "slurm" | "single"


def launch_env() -> LaunchEnv:
    """Rank and world size from the launcher's environment, readable before any process group exists."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        # srun one task per GPU: SLURM's own variables; the sbatch script exports MASTER_ADDR/PORT.
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), "slurm")
    if "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        # One of several srun tasks without a rendezvous address: as "single" each would train alone as rank 0,
        # all writing one run directory.
        raise RuntimeError(
            f"launched by srun as task {env['SLURM_PROCID']} of {env['SLURM_STEP_NUM_TASKS']}, but MASTER_ADDR is "
            "not set: export MASTER_ADDR and MASTER_PORT (launch/slurm/pretrain.sbatch does), or start one task "
            "per node running torchrun")
    return LaunchEnv(0, 1, 0, "single")


def init_distributed(backend: str = "auto", timeout_minutes: float = 30.0) -> LaunchEnv:
    """Initialise torch.distributed from the environment (no-op if already initialised)."""
    le = launch_env()
    if dist.is_initialized():
        return LaunchEnv(dist.get_rank(), dist.get_world_size(), le.local_rank, le.launcher)
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(le.local_rank)
    # DeepSpeed reads these from the environment whatever the launcher (torchrun sets them; srun and a plain
    # process do not).
    os.environ.setdefault("RANK", str(le.rank))
    os.environ.setdefault("WORLD_SIZE", str(le.world_size))
    os.environ.setdefault("LOCAL_RANK", str(le.local_rank))
    if le.launcher == "single":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            from hgrn_megatron.testing.distributed import free_port

            os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group(
        backend=backend,
        rank=le.rank,
        world_size=le.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return le


def set_collective_timeout(minutes: float) -> int:
    """Set the timeout of every process group this rank belongs to (gloo and NCCL; other backends are left as
    they are). A collective that waits longer fails with an error on this rank instead of hanging: after
    start-up the job should not wait out init_distributed's generous timeout. Returns how many groups changed."""
    from torch.distributed import distributed_c10d as c10d

    timeout = datetime.timedelta(minutes=minutes)
    changed = 0
    # torch offers no public setter; _set_pg_timeout (torch >= 2.3) resets the backend's default timeout,
    # which applies to every collective issued afterwards on that group.
    for group in list(c10d._world.pg_map):
        if c10d._rank_not_in_group(group):
            continue
        c10d._set_pg_timeout(timeout, group)
        changed += 1
    return changed


def init_model_parallel(tensor_parallel_size: int, context_parallel_size: int = 1) -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel_size,
                                             context_parallel_size=context_parallel_size)


class MegatronMpu:
    """The `mpu` interface DeepSpeed calls (`get_model_parallel_*`), answered by megatron's parallel_state
    (which names them `get_tensor_model_parallel_*`)."""

    def __init__(self):
        from megatron.core import parallel_state

        self._ps = parallel_state

    def get_model_parallel_rank(self):
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self._ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    # DeepSpeed's data parallelism (gradient averaging, ZeRO partitioning) spans DP x CP: the CP ranks of a
    # sequence hold replicated parameters whose gradients, like those of different sequences, are averaged.
    def get_data_parallel_rank(self):
        return self._ps.get_data_parallel_rank(with_context_parallel=True)

    def get_data_parallel_world_size(self):
        return self._ps.get_data_parallel_world_size(with_context_parallel=True)

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group(with_context_parallel=True)

    # DeepSpeed asks for these when pipeline/sequence parallelism is queried; we use neither.
    def get_pipeline_model_parallel_world_size(self):
        return 1

    def get_pipeline_model_parallel_rank(self):
        return 0

    def get_tensor_model_parallel_rank(self):
        return self.get_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return self.get_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self.get_model_parallel_group()


def all_reduce_flag(flag: bool) -> bool:
    """True on every rank if it is True on any rank (the agreement every collective decision needs)."""
    t = torch.tensor([1.0 if flag else 0.0], device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_max(value: float) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def comm_device() -> torch.device:
    """Where tensors for collectives must live: the current GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
