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
SHARED_PILE = REPO.parent / "shared" / "data" / "pile-sample"


def pytest_configure(config):
    from hgrn_megatron.runtime_env import pytest_filter_lines

    for line in pytest_filter_lines():
        config.addinivalue_line("filterwarnings", line)


@pytest.fixture(scope="session")
def assets_dir() -> pathlib.Path:
    return ASSETS
