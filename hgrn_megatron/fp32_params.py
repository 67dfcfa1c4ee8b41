"""Parameters the forward pass reads in fp32 even when mixed-precision training casts the module to bf16.

The HGRU's phase θ and the lower-bound table set how far back a channel remembers: a phase error of one bf16
ulp (2^-8 relative) turns into a rotation error that grows with the distance a state travels, and a rounded
table moves every layer's γ. Mixed-precision training (DeepSpeed `bf16`) keeps fp32 master copies in the
optimizer but casts the module's parameters to bf16 for the forward pass. For the parameters marked here,
`fp32_view` gives the forward pass the fp32 master value instead, while the gradient still flows to the bf16
module parameter (the optimizer's wrappers are unchanged):

    fp32_view(p) = master + (p − p.detach()).float()      value: master exactly; d/dp: the identity

The training engine (`pretrain/engine.py`) keeps `master` equal to the optimizer's fp32 copy: it sets it after
initialisation, after every optimizer step and after loading a checkpoint. Without a master (fp32 training, a
module that no engine manages) `fp32_view(p)` is `p.float()`.
"""
from __future__ import annotations

import torch

_MARK = "hgrn_keep_fp32"
_MASTER = "hgrn_fp32_master"


def keep_fp32(param: torch.nn.Parameter) -> torch.nn.Parameter:
    """Mark `param` as read in fp32 by the forward pass (returns it)."""
    setattr(param, _MARK, True)
    return param


def fp32_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The marked parameters of `module`, with their names."""
    return [(name, p) for name, p in module.named_parameters() if getattr(p, _MARK, False)]


def set_master(param: torch.nn.Parameter, value: torch.Tensor | None) -> None:
    """Record the fp32 master value of `param` (None forgets it)."""
    setattr(param, _MASTER, None if value is None else value.detach().to(torch.float32).clone())


def master(param: torch.nn.Parameter) -> torch.Tensor | None:
    return getattr(param, _MASTER, None)


def fp32_view(param: torch.Tensor) -> torch.Tensor:
    """`param` in fp32 for the forward pass: the recorded master when `param` is held in lower precision."""
    if param.dtype in (torch.float32, torch.float64):
        return param
    value = master(param)
    if value is None:
        return param.float()
    if value.shape != param.shape:
        raise RuntimeError(f"fp32_view: the fp32 master has shape {tuple(value.shape)} but the parameter "
                           f"{tuple(param.shape)} (was the parameter re-shaped after the master was set?)")
    return value.to(param.device) + (param - param.detach()).float()
