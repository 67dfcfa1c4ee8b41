"""The HGRU's elementwise math as autograd Functions that save the least they can.

Each is a chain of fp32 elementwise ops whose autograd graph would keep several token-sized fp32 tensors for
the backward pass; these keep only their inputs (in the input dtype) and per-token statistics, and recompute
the rest in the backward, from closed-form derivatives. On a GPU in bf16 that is a quarter to a half of the
bytes (activation memory is what bounds the micro-batch), on CPU in fp32 about half; the arithmetic is the same.

- `forget_gate(f, γ)`: (log λ, 1 − λ) for λ = γ + (1 − γ)·σ(f), without rounding λ.
- `gated_input(i, 1 − λ)`: silu(i)·(1 − λ), the scan's input.
- `gated_norm(h, gate, weight, bias)`: Norm(h)·act(gate), the output before W_o (features may be split
  over TP ranks: the statistics are all-reduced forward and backward); with no gate, the mixer norm alone.
  act is silu (the authors' code) or sigmoid (the paper); with `placement="before_norm"` the paper's
  Norm(act(gate)·h) instead.

On CUDA the gated input and (at TP = 1) the gated norm run as single-pass Triton kernels (`hgru_ops_triton.py`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def forget_gate(f: torch.Tensor, lower_bound: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(log λ, 1 − λ)` for λ = γ + (1 − γ)·σ(f), in fp32, without ever rounding λ itself.

    1 − λ = (1 − γ)·σ(−f) exactly. log λ takes whichever form is accurate: log1p(−(1 − λ)) when λ > 1/2 (λ
    within an ulp of 1 still gives the right tiny log λ, where `log` of a rounded λ would give 0), and
    logaddexp(log γ, log(1 − γ) + logσ(f)) otherwise (accurate for small λ, and never above log 1/2, so the
    scan's log gate stays <= 0). γ = None means γ = 0. Differentiable in f and γ (see `_ForgetGate`).
    """
    return _ForgetGate.apply(f, None if lower_bound is None else _wide(lower_bound))


def _forget_gate_values(f: torch.Tensor, gamma: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward of `forget_gate` (fp32 f and γ), reusing its temporaries."""
    one_minus_lambda = torch.sigmoid(-f)
    if gamma is None:
        log_lambda = F.logsigmoid(f)
    else:
        one_minus_lambda.mul_(1.0 - gamma)
        # γ > 0 in every layer that has one (softmax weights are positive); the clamp only guards underflow.
        log_gamma = torch.log(gamma.clamp_min(torch.finfo(torch.float32).tiny))
        log_lambda = F.logsigmoid(f).add_(torch.log1p(-gamma))
        torch.logaddexp(log_gamma, log_lambda, out=log_lambda)
    near_one = one_minus_lambda.clamp(max=0.5).neg_().log1p_()  # the clamp keeps the unused branch finite
    return torch.where(one_minus_lambda < 0.5, near_one, log_lambda), one_minus_lambda


class _ForgetGate(torch.autograd.Function):
    """`forget_gate` with a hand-written backward that saves only f (and γ).

    Autograd through the two-branch forward would save about eight token-sized tensors and run some twenty
    elementwise passes backward; the derivatives have a short closed form. With s = σ(−f), q = (1 − γ)σ(f),
    λ = γ + q:  d log λ/df = s·q/λ,  d(1 − λ)/df = −s·q,  d log λ/dγ = s/λ,  d(1 − λ)/dγ = −s.
    q/λ is taken as 1 where γ = σ(f) = 0 (its limit; the division would give 0/0).
    """

    @staticmethod
    def forward(ctx, f, gamma):
        ctx.save_for_backward(f, gamma)  # f in its own dtype (bf16 in bf16 training): half an fp32 copy's bytes
        return _forget_gate_values(_wide(f), gamma)

    @staticmethod
    def backward(ctx, d_log_lambda, d_one_minus_lambda):
        f, gamma = ctx.saved_tensors
        f_dtype, f = f.dtype, _wide(f)
        s = torch.sigmoid(-f)
        q = torch.sigmoid(f)
        if gamma is None:  # λ = σ(f)
            return torch.addcmul(d_log_lambda, q, d_one_minus_lambda, value=-1).mul_(s).to(f_dtype), None
        q.mul_(1.0 - gamma)
        lam = q + gamma
        df = torch.div(q, lam).nan_to_num_(nan=1.0).mul_(d_log_lambda).addcmul_(q, d_one_minus_lambda, value=-1)
        df.mul_(s)
        d_gamma = None
        if ctx.needs_input_grad[1]:
            d_gamma = torch.div(d_log_lambda, lam).sub_(d_one_minus_lambda).mul_(s).sum_to_size(gamma.shape)
        return df.to(f_dtype), d_gamma


def _wide(t: torch.Tensor) -> torch.Tensor:
    """fp32 for fp32/bf16/fp16 tensors (t itself when already fp32), fp64 kept (the gradcheck path)."""
    return t if t.dtype == torch.float64 else t.float()


def _triton_functions(t: torch.Tensor):
    """`hgru_ops_triton` for CUDA tensors when Triton is importable, else None (the torch Functions below)."""
    if not t.is_cuda:
        return None
    try:
        from hgrn_megatron import hgru_ops_triton
    except ImportError:
        return None
    return hgru_ops_triton


def gated_input(inputs: torch.Tensor, one_minus_lambda: torch.Tensor) -> torch.Tensor:
    """x = silu(inputs)·(1 − λ) in fp32, returned in `inputs`' dtype.

    inputs: `[..., features]`; one_minus_lambda: fp32 `[..., channels]` with features = channels (real variant)
    or 2·channels (complex: (re, im) of a channel share its gate). Saves inputs and 1 − λ only.
    """
    fused = _triton_functions(inputs)
    if fused is not None:
        return fused.GatedInputTriton.apply(inputs, one_minus_lambda)
    return _GatedInput.apply(inputs, one_minus_lambda)


class _GatedInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, one_minus_lambda):
        pairs = inputs.shape[-1] // one_minus_lambda.shape[-1]  # 2 (complex) or 1 (real)
        x = F.silu(_wide(inputs)).unflatten(-1, (-1, pairs)).mul_(one_minus_lambda.unsqueeze(-1))
        ctx.save_for_backward(inputs, one_minus_lambda)
        return x.flatten(-2).to(inputs.dtype)

    @staticmethod
    def backward(ctx, dx):
        inputs, one_minus_lambda = ctx.saved_tensors
        pairs = inputs.shape[-1] // one_minus_lambda.shape[-1]
        x = _wide(inputs)
        dx = _wide(dx).unflatten(-1, (-1, pairs))
        d_inputs = torch.ops.aten.silu_backward((dx * one_minus_lambda.unsqueeze(-1)).flatten(-2), x)
        d_one_minus_lambda = (dx * F.silu(x).unflatten(-1, (-1, pairs))).sum(-1)
        return d_inputs.to(inputs.dtype), d_one_minus_lambda


GATE_ACTIVATIONS = ("silu", "sigmoid")
GATE_PLACEMENTS = ("after_norm", "before_norm")


def gated_norm(h: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
               eps: float, tp_group=None, hidden_size: int | None = None, *, activation: str = "silu",
               placement: str = "after_norm") -> torch.Tensor:
    """Norm(h)·act(gate) (just Norm(h) when gate is None) over the last axis, in fp32, returned in h's dtype:
    LayerNorm when `bias` is given, RMSNorm otherwise; act = `activation` (silu or sigmoid). Saves h, gate and
    the per-token statistics. `placement="before_norm"`: Norm(act(gate)·h) (HGRN §3.2's form), composed
    from autograd ops and the norm alone.

    With `tp_group` of more than one rank, h holds this rank's slice of `hidden_size` features: the statistics
    are summed over the group in the forward pass, and so are the two per-token sums of the backward pass
    (each rank's features feed every rank's outputs through them).
    """
    if activation not in GATE_ACTIVATIONS or placement not in GATE_PLACEMENTS:
        raise ValueError(f"gated_norm: activation must be one of {GATE_ACTIVATIONS} and placement one of "
                         f"{GATE_PLACEMENTS} (got {activation!r}, {placement!r})")
    if tp_group is not None and dist.get_world_size(tp_group) == 1:
        tp_group = None
    if gate is not None and placement == "before_norm":
        gated = _wide(h) * _activate(_wide(gate), activation)
        return gated_norm(gated, None, weight, bias, eps, tp_group, hidden_size).to(h.dtype)
    silu_gate = gate is not None and activation == "silu"
    fused = _triton_functions(h) if tp_group is None and silu_gate else None
    if fused is not None:
        return fused.GatedNormTriton.apply(h, gate, weight, bias, eps)
    return _GatedNorm.apply(h, gate, weight, bias, eps, tp_group, hidden_size or h.shape[-1], activation)


def _activate(g: torch.Tensor, activation: str) -> torch.Tensor:
    return F.silu(g) if activation == "silu" else torch.sigmoid(g)


def _activate_backward(grad: torch.Tensor, g: torch.Tensor, activation: str) -> torch.Tensor:
    """grad · act'(g)."""
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, g)
    s = torch.sigmoid(g)
    return grad * s * (1.0 - s)


def _feature_sum(t: torch.Tensor, group) -> torch.Tensor:
    """Sum over the last axis (kept), over every TP rank's features."""
    total = t.sum(-1, keepdim=True)
    if group is not None:
        dist.all_reduce(total, group=group)
    return total


def _sum_backward_statistics(stats: torch.Tensor, group) -> torch.Tensor:
    """The backward pass's per-token sums over every rank's features (one all-reduce for both)."""
    if group is not None:
        dist.all_reduce(stats, group=group)
    return stats


class _GatedNorm(torch.autograd.Function):
    """A LayerNorm with all features on this rank runs torch's fused kernels (one pass each way, the mean and
    1/std come with them); RMSNorm and TP-split features use the composition below."""

    @staticmethod
    def forward(ctx, h, gate, weight, bias, eps, group, hidden_size, activation="silu"):
        h32 = _wide(h)  # h itself when h is fp32: never written in place
        ctx.fused = bias is not None and group is None
        if ctx.fused:
            y, mean, rstd = torch.native_layer_norm(h32, (hidden_size,), _wide(weight), _wide(bias), eps)
        else:
            mean = _feature_sum(h32, group) / hidden_size if bias is not None else None
            centred = h32 - mean if mean is not None else h32
            rstd = torch.rsqrt(_feature_sum(centred.square(), group) / hidden_size + eps)
            x_hat = centred * rstd
            y = torch.addcmul(_wide(bias), x_hat, _wide(weight)) if bias is not None else x_hat.mul_(_wide(weight))
        ctx.save_for_backward(h, gate, weight, bias, mean, rstd)
        ctx.group, ctx.hidden_size, ctx.eps, ctx.activation = group, hidden_size, eps, activation
        if gate is not None:
            y.mul_(_activate(_wide(gate), activation))
        return y.to(h.dtype)

    @staticmethod
    def backward(ctx, dout):
        h, gate, weight, bias, mean, rstd = ctx.saved_tensors
        h32 = _wide(h)
        if not ctx.fused:
            x_hat = (h32 - mean if mean is not None else h32) * rstd  # normalised h (h32 may be h: not in place)
        dout = _wide(dout)  # may be the caller's tensor: read only
        d_gate = None
        dy = dout if ctx.fused else dout.clone()  # the composition updates dy in place
        if gate is not None:
            if ctx.fused:
                y = torch.native_layer_norm(h32, (ctx.hidden_size,), _wide(weight), _wide(bias), ctx.eps)[0]
            else:
                y = torch.addcmul(_wide(bias), x_hat, _wide(weight)) if bias is not None else x_hat * _wide(weight)
            gate32 = _wide(gate)
            d_gate = _activate_backward(dout * y, gate32, ctx.activation).to(gate.dtype)
            dy = dout * _activate(gate32, ctx.activation)
        if ctx.fused:
            dh, d_weight, d_bias = torch.ops.aten.native_layer_norm_backward(
                dy, h32, (ctx.hidden_size,), mean, rstd, _wide(weight), _wide(bias), [True, True, True])
            return dh.to(h.dtype), d_gate, d_weight.to(weight.dtype), d_bias.to(bias.dtype), None, None, None, None
        reduce_dims = tuple(range(dy.dim() - 1))
        d_weight = (dy * x_hat).sum(reduce_dims).to(weight.dtype)
        d_bias = dy.sum(reduce_dims).to(bias.dtype) if bias is not None else None
        dx_hat = dy.mul_(_wide(weight))
        # d/dh of the normalisation: rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)), means over all features; RMSNorm
        # has no mean(dx̂) term.
        sums = [(dx_hat * x_hat).sum(-1, keepdim=True)]
        if mean is not None:
            sums.append(dx_hat.sum(-1, keepdim=True))
        means = _sum_backward_statistics(torch.cat(sums, dim=-1), ctx.group) / ctx.hidden_size
        dh = dx_hat.sub_(x_hat.mul_(means[..., :1]))
        if mean is not None:
            dh.sub_(means[..., 1:])
        return dh.mul_(rstd).to(h.dtype), d_gate, d_weight, d_bias, None, None, None, None
