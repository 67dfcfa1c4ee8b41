import importlib
import os

import torch


def test_cpu_environment_builds_no_deepspeed_ops():
    # conftest configured the process through hgrn_megatron.runtime_env, as the trainer does.
    if torch.cuda.is_available():
        return
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    assert os.environ["TORCH_EXTENSIONS_DIR"].endswith(os.path.join(".cache", "torch_extensions"))
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    assert ds_comm_torch.build_shm_op() is None  # the shared-memory op would be a 25-40 s JIT build
    assert not hasattr(torch, "build_shm_op")  # the patch landed on DeepSpeed's module, not on torch
