"""Context parallelism for the HGRN recurrence: a sequence split over ranks, passing only recurrent states.

The sequence is cut into CP contiguous pieces, piece r on rank r of the CP group. Within piece r the scan is
h_t = a_t h_{t−1} + x_t (a_t = λ_t e^{iθ}, zero where a document starts), so with H_r the state entering the
piece, its outgoing state is F_r = A_r H_r + S_r: A_r = ∏ a_t is the piece's total decay (zero when a document
starts inside it) and S_r its final state from a zero start. The entering states follow in rank order,
H_0 = the initial state, H_{r+1} = A_r H_r + S_r, so the ranks exchange (A_r, S_r), per batch row and channel
only, one all-gather of O(B·D) per layer whatever T, and every rank folds the states of the ranks before it.

Each rank then runs its piece once more, from H_r, with autograd: the outputs and what is saved for the
backward pass are exactly those of a single-rank scan over the piece (its gates and its output), so the
activation memory per rank is the piece's share. The first rank starts from the true initial state already
and the last rank's S is never needed, so at CP = 2 each rank runs one scan forward and one backward.

Backward: the gradient of the outgoing state F_r is μ_{r+1}, the total gradient of the next piece's entering
state. With e_q = ∂L/∂H_q through piece q's own outputs (one backward pass over it), μ_q = e_q + conj(A_q)·μ_{q+1}:
the ranks all-gather e (again O(B·D)) and each folds μ backwards, then back-propagates its piece with
(dh, dF + μ_{r+1}). The explicit `autograd.Function` (rather than torch's differentiable all_gather) exchanges
only one state per rank in the backward, runs on gloo (all_gather only, no reduce_scatter or all_to_all) and
is entered on every rank, the first included, so the backward collective can never be skipped by one rank.

`exchange_counter` counts the bytes each call gathers, for checks that they do not grow with T.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from hgrn_megatron import kernels


@dataclass
class ExchangeCounter:
    """Collectives and bytes gathered on this rank by `context_parallel_scan` (forward and backward)."""

    calls: int = 0
    bytes: int = 0

    def add(self, gathered: torch.Tensor) -> None:
        self.calls += 1
        self.bytes += gathered.numel() * gathered.element_size()

    def reset(self) -> None:
        self.calls = self.bytes = 0


exchange_counter = ExchangeCounter()


def _mul(a: torch.Tensor, b: torch.Tensor, complex_mode: bool, conjugate_a: bool = False) -> torch.Tensor:
    """a·b for real states, or for complex ones stored as (re, im) on a last axis (conj(a)·b if asked)."""
    if not complex_mode:
        return a * b
    ar, ai = a.unbind(-1)
    if conjugate_a:
        ai = -ai
    br, bi = b.unbind(-1)
    return torch.stack((ar * br - ai * bi, ar * bi + ai * br), dim=-1)


def piece_decay(g: torch.Tensor, theta: torch.Tensor | None, reset: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
    """A = ∏_t λ_t e^{iθ} over the piece `[B, D]` (complex: `[B, D, 2]`), zero in rows where a document starts.

    Summed and rotated in float64: L·θ must not lose the phase (in fp32 a 16 k-token piece would be off by
    ~1e-3 rad)."""
    log_decay = g.detach().double().sum(dim=1)  # [B, D]
    decay = torch.exp(log_decay)
    if reset is not None:
        decay = decay * (~reset.any(dim=1)).to(decay.dtype)[:, None]
    if theta is not None:
        phase = theta.detach().double() * g.shape[1]
        decay = torch.stack((decay * torch.cos(phase), decay * torch.sin(phase)), dim=-1)
    return decay.to(dtype)


def _all_gather(t: torch.Tensor, group) -> torch.Tensor:
    """`[world, *t.shape]`: every rank's t in rank order."""
    world = dist.get_world_size(group)
    out = t.new_empty(world * t.numel())  # flat: gloo wants the output as the inputs concatenated on dim 0
    dist.all_gather_into_tensor(out, t.contiguous().view(-1), group=group)
    exchange_counter.add(out)
    return out.view(world, *t.shape)


class _ContextParallelScan(torch.autograd.Function):
    """See the module docstring. Inputs in `hgrn_scan`'s layout; returns (h, outgoing state)."""

    @staticmethod
    def forward(ctx, x, g, theta, initial_state, reset, group, backend, build_graph):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        complex_mode = theta is not None
        state_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        scan = dict(theta=theta, reset=reset, backend=backend, check_values=False, output_final_state=True)
        shape = (x.shape[0], x.shape[2], 2) if complex_mode else (x.shape[0], x.shape[2])
        leaves = [t.detach().requires_grad_(t.requires_grad) if t is not None else None
                  for t in (x, g, theta, initial_state)]
        if rank == 0:
            incoming = leaves[3]
            with torch.set_grad_enabled(build_graph):  # this piece starts from the true state: its only scan
                h, outgoing = kernels.hgrn_scan(leaves[0], leaves[1], **{**scan, "theta": leaves[2]},
                                                initial_state=incoming)
            local_final = outgoing.detach()
        elif rank < world - 1:
            with torch.no_grad():
                local_final = kernels.hgrn_scan(x, g, **scan)[1]
        else:
            local_final = x.new_zeros(shape, dtype=state_dtype)  # the last piece's S is never used
        decay = piece_decay(g, theta, reset, state_dtype)
        gathered = _all_gather(torch.stack((decay, local_final.to(state_dtype))), group)  # [world, 2, ...]
        if rank > 0:
            incoming = gathered[0, 1]
            for q in range(1, rank):
                incoming = _mul(gathered[q, 0], incoming, complex_mode) + gathered[q, 1]
            incoming = incoming.detach().requires_grad_(build_graph)
            with torch.set_grad_enabled(build_graph):
                h, outgoing = kernels.hgrn_scan(leaves[0], leaves[1], **{**scan, "theta": leaves[2]},
                                                initial_state=incoming)
        ctx.inner = (h, outgoing, leaves, incoming) if build_graph else None
        ctx.decays = gathered[:, 0]
        ctx.rank, ctx.world, ctx.group, ctx.complex_mode = rank, world, group, complex_mode
        return h.detach(), outgoing.detach()

    @staticmethod
    def backward(ctx, dh, doutgoing):
        h, outgoing, leaves, incoming = ctx.inner
        ctx.inner = None
        rank, world = ctx.rank, ctx.world
        dh = torch.zeros_like(h) if dh is None else dh
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = None
        # e_r: the gradient of the entering state through this piece alone (the first piece has none to send).
        # The last piece's outgoing state feeds no other rank, so its one backward pass gives everything.
        if rank == 0:
            own = torch.zeros_like(outgoing)
        elif rank == world - 1:
            own, *grads = _piece_grads(h, outgoing, [incoming, *wanted], dh, doutgoing, retain=False)
        else:
            own = _piece_grads(h, outgoing, [incoming], dh, doutgoing, retain=True)[0]
        own_all = _all_gather(own.to(outgoing.dtype), ctx.group)  # [world, ...]
        if grads is None:
            following = torch.zeros_like(outgoing)  # μ_{r+1}: the total gradient of the next piece's entry
            for q in range(world - 1, rank, -1):
                following = own_all[q] + _mul(ctx.decays[q], following, ctx.complex_mode, conjugate_a=True)
            total = following if doutgoing is None else following + doutgoing
            grads = _piece_grads(h, outgoing, wanted, dh, total, retain=False) if wanted else []
        found = dict(zip(map(id, wanted), grads))
        return (*(found.get(id(t)) if t is not None else None for t in leaves), None, None, None, None)


def context_parallel_scan(x, g, *, theta=None, initial_state=None, reset=None, group=None, backend="auto",
                          output_final_state=False):
    """`kernels.hgrn_scan` over a sequence split into contiguous pieces, one per rank of `group` (piece r on
    CP rank r); every argument is this rank's piece, in `hgrn_scan`'s layout.

    `initial_state` is the state before the sequence's first token: read on the first rank only (the others
    may pass None). The returned state is the one after this rank's piece, so the last rank's is the
    sequence's final state. Differentiable in x, g, theta and initial_state; every rank of `group` must call
    it, and run its backward, in the same order. Without a group, or with one rank, it is `hgrn_scan`.
    """
    if group is None or dist.get_world_size(group) == 1:
        return kernels.hgrn_scan(x, g, theta=theta, initial_state=initial_state, reset=reset, backend=backend,
                                 output_final_state=output_final_state, check_values=False)
    if dist.get_rank(group) > 0:
        initial_state = None
    # Without autograd (evaluation, or the first pass of activation recompute) no inner graph is built.
    build_graph = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, g, theta, initial_state))
    h, final = _ContextParallelScan.apply(x, g, theta, initial_state, reset, group, backend, build_graph)
    return h, (final if output_final_state else None)


def _piece_grads(h, outgoing, inputs, dh, doutgoing, retain):
    """Gradients of the piece's scan with respect to `inputs`, for output gradients (dh, doutgoing)."""
    outputs, grads = [h], [dh]
    if doutgoing is not None:
        outputs.append(outgoing)
        grads.append(doutgoing)
    return torch.autograd.grad(outputs, inputs, grads, retain_graph=retain, allow_unused=True)


def sequence_piece(t: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """This CP rank's contiguous piece of `t` along `dim` (the sequence axis; `[b, s]` tensors by default)."""
    if group is None or dist.get_world_size(group) == 1:
        return t
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if t.shape[dim] % world:
        raise ValueError(f"context parallelism: a sequence of {t.shape[dim]} tokens does not split into {world} "
                         "equal pieces (make seq_length a multiple of the context-parallel size)")
    return t.narrow(dim, rank * (t.shape[dim] // world), t.shape[dim] // world)
