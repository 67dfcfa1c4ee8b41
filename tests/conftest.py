"""Test-suite set-up: environment for DeepSpeed/megatron on CPU (one place) and shared fixtures."""
import os

# Triton's interpreter must be chosen before triton is imported anywhere in the process.
os.environ.setdefault("TRITON_INTERPRET", "1")

from hgrn_megatron.runtime_env import configure_environment, patch_for_cpu

configure_environment()
patch_for_cpu()

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
ASSETS = REPO / "tests" / "assets"


def pytest_configure(config):
    from hgrn_megatron.runtime_env import pytest_filter_lines

    for line in pytest_filter_lines():
        config.addinivalue_line("filterwarnings", line)


@pytest.fixture(scope="session")
def assets_dir() -> pathlib.Path:
    return ASSETS


@pytest.fixture
def nan_filled_empty(monkeypatch):
    """torch.empty, torch.empty_like and Tensor.new_empty hand out NaN-filled floating tensors (fla's test
    trick): a kernel that leaves part of an output unwritten, or reads a buffer before writing it, then fails
    its reference comparison instead of passing on memory that happened to be zero."""
    import torch

    def nan_filled(make):
        def wrapper(*args, **kwargs):
            t = make(*args, **kwargs)
            if t.is_floating_point() or t.is_complex():
                with torch.no_grad():
                    t.fill_(complex(float("nan"), float("nan")) if t.is_complex() else float("nan"))
            return t
        return wrapper

    monkeypatch.setattr(torch, "empty", nan_filled(torch.empty))
    monkeypatch.setattr(torch, "empty_like", nan_filled(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", nan_filled(torch.Tensor.new_empty))
