"""hgrn_megatron.kernels: the HGRN linear recurrence (real and complex), pure math.

Imports nothing from the rest of the project and never touches torch.distributed or megatron.
Public surface: `hgrn_scan` (one entry point, backends "reference" | "cpu" | "torch" | "triton" | "auto") and
`hgrn_scan_reference` (the float64 loop every backend is tested against). The Triton module is imported
lazily, so CPU users never need a GPU toolchain; the fused CPU kernel is compiled on its first use.
"""
from .naive import hgrn_scan_reference
from .scan import BACKENDS, hgrn_scan

__all__ = ["BACKENDS", "hgrn_scan", "hgrn_scan_reference"]
