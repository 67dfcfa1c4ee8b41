"""hgrn_megatron.kernels: the HGRN linear recurrence (real and complex), pure math.

Imports nothing from the rest of the project and never touches torch.distributed or megatron.
"""
