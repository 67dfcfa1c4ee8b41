"""Model tests: until `hgrn_megatron.kernels.hgrn_scan` exists, a float64 loop stands in for it."""
import torch

from hgrn_megatron import kernels

if not hasattr(kernels, "hgrn_scan"):

    def _scan_loop(x, g, *, theta=None, initial_state=None, output_final_state=False, reset=None, backend="auto"):
        B, T, D = g.shape
        rotation = None if theta is None else torch.complex(torch.cos(theta.double()), torch.sin(theta.double()))
        xs = torch.view_as_complex(x.double().contiguous()) if theta is not None else x.double()
        h = torch.zeros_like(xs[:, 0])
        out = []
        for t in range(T):
            decay = torch.exp(g[:, t].double())
            if rotation is not None:
                decay = decay * rotation
            if reset is not None:
                decay = torch.where(reset[:, t, None], torch.zeros_like(decay), decay)
            h = decay * h + xs[:, t]
            out.append(h)
        y = torch.stack(out, dim=1)
        y = torch.view_as_real(y) if theta is not None else y
        return y.to(x.dtype), None

    kernels.hgrn_scan = _scan_loop
