"""Every kernel test runs with NaN-filled torch.empty (see `nan_filled_empty` in tests/conftest.py)."""
import pytest


@pytest.fixture(autouse=True)
def _uninitialised_memory_is_nan(nan_filled_empty):
    yield

