"""HGRN language model for transformers: one self-contained file (pure torch).

Hierarchically Gated Recurrent Network (Qin, Yang, Zhong: "Hierarchically Gated Recurrent Neural Network for
Sequence Modeling", NeurIPS 2023, arXiv:2311.04823), as trained by the hgrn-megatron framework and exported by
`hgrn-export-hf`. Each block is `x + Mixer(Norm(x))` then `x + SwiGLU(Norm(x))`; the token mixer (HGRU) runs
the linear recurrence

    h_t = lambda_t * e^(i*theta) * h_{t-1} + (1 - lambda_t) * silu(x_t W_i)        (complex variant)
    h_t = lambda_t * h_{t-1} + (1 - lambda_t) * silu(x_t W_i)                      (real variant)

with the forget gate `lambda_t = gamma_k + (1 - gamma_k) * sigmoid(x_t W_f)` bounded below by a per-layer
`gamma_k` that rises with depth (paper, section 3.2). The output is `W_o(Norm([Re h, Im h]) * silu(x W_g))` as in
the authors' code, or in the paper's form `W_o(LayerNorm(sigmoid(x W_g) * [Re h, Im h]))`: the gate's activation
(`output_gate_activation`) and place (`output_gate_placement`) are settings of the config, as are biases.
Complex features are laid out channel-major, `(re_0, im_0, re_1, im_1, ...)`, in W_i, W_g, the mixer norm and
W_o's input, as in the training framework (a norm over all features does not depend on their order).

Generation carries one `[batch, channels]` state per layer (`HGRNCache`), so a decode step costs the same at any
context length. Left padding is supported: padded positions leave the state untouched. This file imports
nothing from the training framework; on CUDA it uses the framework's Triton scan when that is importable.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_hgrn import HGRNConfig

try:  # the framework's Triton kernels, when this file runs where the framework is installed
    from hgrn_megatron.kernels import hgrn_scan as _framework_scan
except Exception:  # noqa: BLE001 - any import failure means "not available"; the torch scan is always correct
    _framework_scan = None

_SCAN_CHUNK = 64


def linear_recurrence(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """All states of `h_t = a_t * h_{t-1} + b_t` for a, b `[B, T, D]` (real or complex), `h_{-1} = h0` or 0.

    A chunked parallel scan: within chunks of `_SCAN_CHUNK` steps a Hillis-Steele doubling scan (log2 C
    vectorised passes, only products of coefficients of modulus <= 1, so nothing overflows), then the same
    scan over the chunk ends gives each chunk's incoming state. Work O(T D log C), no Python loop over time.
    """
    bsz, seq_len, dim = b.shape
    if h0 is not None:
        b = torch.cat([b[:, :1] + a[:, :1] * h0[:, None], b[:, 1:]], dim=1)
    if seq_len == 1:
        return b
    chunk = min(_SCAN_CHUNK, seq_len)
    pad = -seq_len % chunk
    if pad:  # identity steps at the end; their outputs are dropped
        a = torch.cat([a, a.new_ones(bsz, pad, dim)], dim=1)
        b = torch.cat([b, b.new_zeros(bsz, pad, dim)], dim=1)
    n = a.shape[1] // chunk
    a, b = a.view(bsz, n, chunk, dim), b.view(bsz, n, chunk, dim)
    step = 1
    while step < chunk:  # inclusive scan inside every chunk at once
        b = torch.cat([b[:, :, :step], a[:, :, step:] * b[:, :, :-step] + b[:, :, step:]], dim=2)
        a = torch.cat([a[:, :, :step], a[:, :, step:] * a[:, :, :-step]], dim=2)
        step *= 2
    if n > 1:  # carry the state across chunks: scan the chunk ends, then add each chunk's incoming state
        ends = linear_recurrence(a[:, :, -1], b[:, :, -1])
        incoming = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], dim=1)
        b = b + a * incoming[:, :, None]
    return b.reshape(bsz, n * chunk, dim)[:, :seq_len]


def _logsigmoid(x: torch.Tensor) -> torch.Tensor:
    """log(sigmoid(x)). torch's CPU `logsigmoid` costs milliseconds on a tiny tensor when it runs on several
    threads (measured: 5.7 ms vs 4 us for a decode step's 512 values), so small inputs use -softplus(-x)."""
    return F.logsigmoid(x) if x.numel() >= 1 << 16 else -F.softplus(-x)


def _make_norm(kind: str, size: int, eps: float) -> nn.Module:
    return nn.RMSNorm(size, eps=eps) if kind == "rmsnorm" else nn.LayerNorm(size, eps=eps)


def _norm_fp32(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply an nn.RMSNorm / nn.LayerNorm with statistics and affine parameters in fp32."""
    weight = norm.weight.float()
    if isinstance(norm, nn.RMSNorm):
        return F.rms_norm(x.float(), norm.normalized_shape, weight, norm.eps)
    return F.layer_norm(x.float(), norm.normalized_shape, weight, norm.bias.float(), norm.eps)


class HGRNMixer(nn.Module):
    """The HGRU token mixer of one layer. State: `[B, D]` complex64 (complex variant) or float32 (real)."""

    def __init__(self, config: HGRNConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_complex = config.variant == "complex"
        self.channels = config.recurrent_channels
        self.scan_backend = config.scan_backend
        width = 2 * self.channels if self.is_complex else self.channels  # (re, im) pairs for complex
        bias = config.mixer_bias
        self.i_proj = nn.Linear(config.hidden_size, width, bias=bias)
        self.f_proj = nn.Linear(config.hidden_size, self.channels, bias=bias)
        self.g_proj = nn.Linear(config.hidden_size, width, bias=bias) if config.output_gate else None
        self.out_norm = _make_norm(config.mixer_norm, width, config.norm_epsilon)
        self.o_proj = nn.Linear(width, config.hidden_size, bias=bias)
        self.theta = nn.Parameter(torch.empty(self.channels)) if self.is_complex else None
        self.gate_activation = F.silu if config.output_gate_activation == "silu" else torch.sigmoid
        self.gate_before_norm = config.output_gate_placement == "before_norm"

    def forward(self, x, lower_bound=None, pad_mask=None, doc_start=None, state=None):
        """x `[B, T, hidden]`; lower_bound `[D]` or None (gamma = 0); pad_mask `[B, T]` True at real tokens;
        doc_start `[B, T]` True where the state is cleared before the update. Returns (output, last state)."""
        f = self.f_proj(x).float()
        one_minus_lam = torch.sigmoid(-f)  # 1 - lambda = (1 - gamma) sigmoid(-f), exactly rearranged
        if lower_bound is None:
            log_lam = _logsigmoid(f)
        else:  # log(gamma + (1 - gamma) sigmoid(f)) without rounding lambda first
            gamma = lower_bound.float()
            one_minus_lam = (1 - gamma) * one_minus_lam
            log_gamma = gamma.clamp_min(torch.finfo(torch.float32).tiny).log()  # softmax weights are > 0
            log_lam = torch.logaddexp(log_gamma, torch.log1p(-gamma) + _logsigmoid(f))
        # Near lambda = 1, log1p(-(1 - lambda)) is the accurate form (as the framework computes it); the clamp
        # keeps the discarded branch finite so its gradient is not NaN.
        log_lam = torch.where(one_minus_lam < 0.5, torch.log1p(-one_minus_lam.clamp(max=0.5)), log_lam)
        inputs = F.silu(self.i_proj(x).float())
        # The scan input is rounded to the activation dtype, as the framework feeds its kernel (no-op in fp32).
        if self.is_complex:
            pairs = inputs.unflatten(-1, (self.channels, 2)) * one_minus_lam[..., None]
            b = torch.view_as_complex(pairs.to(x.dtype).float().contiguous())
        else:
            b = (inputs * one_minus_lam).to(x.dtype).float()

        if self._use_framework_kernel(x, pad_mask, state):
            h, last = self._framework_scan(b, log_lam, doc_start, pad_mask, state)
        else:
            a = torch.polar(log_lam.exp(), self.theta.float().expand_as(log_lam)) if self.is_complex else log_lam.exp()
            if doc_start is not None:
                a = a.masked_fill(doc_start[..., None], 0)
            if pad_mask is not None:  # padded steps are the identity: the state passes through untouched
                keep = pad_mask[..., None]
                a = torch.where(keep, a, torch.ones_like(a))
                b = torch.where(keep, b, torch.zeros_like(b))
            h = linear_recurrence(a, b, state)
            last = h[:, -1]
        features = torch.view_as_real(h).flatten(-2) if self.is_complex else h
        # The scan hands back h in the input's dtype; the norm and the gate then run in fp32.
        features = features.to(x.dtype).float()
        gate = None if self.g_proj is None else self.gate_activation(self.g_proj(x).float())
        if gate is not None and self.gate_before_norm:  # the paper's LayerNorm(g * h)
            out = _norm_fp32(self.out_norm, features * gate)
        else:  # the authors' code: Norm(h) * g
            out = _norm_fp32(self.out_norm, features)
            out = out if gate is None else out * gate
        return self.o_proj(out.to(x.dtype)), last

    def _use_framework_kernel(self, x, pad_mask, state) -> bool:
        if _framework_scan is None or self.scan_backend != "auto" or not x.is_cuda:
            return False
        if pad_mask is None:
            return True
        # The kernel cannot skip a step; zeroed inputs are only a no-op while the state is still zero
        # (left padding of a fresh sequence).
        return state is None and bool((pad_mask[:, 1:] >= pad_mask[:, :-1]).all())

    def _framework_scan(self, b, log_lam, doc_start, pad_mask, state):
        if pad_mask is not None:
            b = b * pad_mask[..., None]
        x = torch.view_as_real(b) if self.is_complex else b
        h0 = None if state is None else (torch.view_as_real(state) if self.is_complex else state)
        h, last = _framework_scan(
            x.contiguous(), log_lam.contiguous(), theta=self.theta.float() if self.is_complex else None,
            initial_state=h0, output_final_state=True, reset=doc_start, backend="auto",
        )
        if self.is_complex:
            return torch.view_as_complex(h.float().contiguous()), torch.view_as_complex(last.contiguous())
        return h.float(), last


class HGRNMLP(nn.Module):
    """SwiGLU channel mixer: `down(silu(gate(x)) * up(x))` (Shazeer, "GLU Variants Improve Transformer", 2020)."""

    def __init__(self, config: HGRNConfig):
        super().__init__()
        d, ffn, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, ffn, bias=bias)
        self.up_proj = nn.Linear(d, ffn, bias=bias)
        self.down_proj = nn.Linear(ffn, d, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HGRNBlock(nn.Module):
    def __init__(self, config: HGRNConfig, layer_idx: int):
        super().__init__()
        self.input_norm = _make_norm(config.norm, config.hidden_size, config.norm_epsilon)
        self.mixer = HGRNMixer(config, layer_idx)
        self.mlp_norm = _make_norm(config.norm, config.hidden_size, config.norm_epsilon)
        self.mlp = HGRNMLP(config)

    def forward(self, x, lower_bound, pad_mask, doc_start, state):
        mixed, state = self.mixer(self.input_norm(x), lower_bound, pad_mask, doc_start, state)
        x = x + mixed
        return x + self.mlp(self.mlp_norm(x)), state


class HGRNCache:
    """Recurrent state for generation: per layer `[B, channels]`, plus the tokens seen so far and whether each
    sequence's last token was EOS (a document boundary when the model resets its state at documents)."""

    def __init__(self, num_layers: int):
        self.states: list[torch.Tensor | None] = [None] * num_layers
        self.seen_tokens = 0
        self.seen_token_ids = 0  # of those, fed as ids: generate() from inputs_embeds keeps only new ids
        self.last_token_was_eos: torch.Tensor | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search)."""
        self.states = [s.index_select(0, beam_idx.to(s.device)) if s is not None else None for s in self.states]
        if self.last_token_was_eos is not None:
            rows = beam_idx.to(self.last_token_was_eos.device)
            self.last_token_was_eos = self.last_token_was_eos.index_select(0, rows)


@dataclass
class HGRNCausalLMOutput(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: HGRNCache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class HGRNPreTrainedModel(PreTrainedModel):
    config_class = HGRNConfig
    base_model_prefix = "model"
    _no_split_modules = ["HGRNBlock"]
    _is_stateful = True  # a recurrent state cannot be rolled back (no assisted generation)
    supports_gradient_checkpointing = False

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not build a key/value cache: this model keeps its own HGRNCache

    def _init_weights(self, module):
        super()._init_weights(module)
        with torch.no_grad():
            if isinstance(module, HGRNMixer) and module.theta is not None and not _initialized(module.theta):
                # RoPE-like phases 10000^(-2j/d) (the paper's initialisation of theta)
                j = torch.arange(module.channels, dtype=torch.float32, device=module.theta.device)
                module.theta.copy_(10000.0 ** (-2.0 * j / module.channels))
            bounds = module.lower_bounds if isinstance(module, HGRNModel) else None
            if bounds is not None and not _initialized(bounds):
                bounds.zero_()  # uniform softmax over layers


def _initialized(param: torch.Tensor) -> bool:
    return bool(getattr(param, "_is_hf_initialized", False))


class HGRNModel(HGRNPreTrainedModel):
    def __init__(self, config: HGRNConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.lower_bounds = (
            nn.Parameter(torch.zeros(config.num_hidden_layers, config.recurrent_channels))
            if config.use_lower_bound else None
        )
        self.layers = nn.ModuleList(HGRNBlock(config, k) for k in range(config.num_hidden_layers))
        self.norm = _make_norm(config.norm, config.hidden_size, config.norm_epsilon)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def layer_lower_bounds(self) -> list[torch.Tensor | None]:
        """gamma for each layer: softmax over layers, cumulative sum, minus its first row, so layer 0 gets 0 and
        the bound rises with depth below 1 (paper, section 3.2). Layer 0 returns None (exactly 0, no gradient)."""
        if self.lower_bounds is None:
            return [None] * len(self.layers)
        probs = self.lower_bounds.float().softmax(dim=0)
        gammas = probs.cumsum(dim=0) - probs[0]
        return [None] + [gammas[k] for k in range(1, len(self.layers))]

    def forward(self, input_ids=None, attention_mask=None, doc_start=None, inputs_embeds=None, cache=None,
                use_cache=False, output_hidden_states=False):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        seq_len = x.shape[1]
        pad_mask = None
        if attention_mask is not None:
            pad_mask = attention_mask[:, -seq_len:].bool()
            if bool(pad_mask.all()):
                pad_mask = None
        if cache is None and use_cache:
            cache = HGRNCache(len(self.layers))
        if doc_start is None and self.config.reset_at_document_boundary and input_ids is not None:
            doc_start = self._doc_starts_after_eos(input_ids, cache)
        hidden = [] if output_hidden_states else None
        for k, (layer, bound) in enumerate(zip(self.layers, self.layer_lower_bounds())):
            if hidden is not None:
                hidden.append(x)
            state = cache.states[k] if cache is not None else None
            x, state = layer(x, bound, pad_mask, doc_start, state)
            if cache is not None:
                cache.states[k] = state
        x = self.norm(x)
        if hidden is not None:
            hidden.append(x)
        if cache is not None:
            cache.seen_tokens += seq_len
            cache.seen_token_ids += seq_len if input_ids is not None else 0
            if input_ids is not None and self.config.eos_token_id is not None:
                cache.last_token_was_eos = input_ids[:, -1] == self.config.eos_token_id
        return x, cache, tuple(hidden) if hidden is not None else None

    def _doc_starts_after_eos(self, input_ids, cache):
        """Documents are `tokens + EOS` in training; the token after an EOS starts a new document."""
        eos = self.config.eos_token_id
        if eos is None:
            raise ValueError("reset_at_document_boundary needs config.eos_token_id or an explicit doc_start mask")
        prev_eos = cache.last_token_was_eos if cache is not None else None
        if prev_eos is None:
            prev_eos = torch.zeros_like(input_ids[:, 0], dtype=torch.bool)
        return torch.cat([prev_eos[:, None], input_ids[:, :-1] == eos], dim=1)


class HGRNForCausalLM(HGRNPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HGRNConfig):
        super().__init__(config)
        self.model = HGRNModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, doc_start=None, inputs_embeds=None, cache=None,
                labels=None, use_cache=None, output_hidden_states=None, return_dict=None, logits_to_keep=0,
                past_key_values=None, **kwargs):
        """Logits `[B, T, vocab]` (fp32). `labels` (shifted inside, -100 ignored) give the mean next-token loss.
        `attention_mask` marks real tokens (left padding); `doc_start` marks document starts (state reset) when
        `config.reset_at_document_boundary`; `cache` (alias `past_key_values`) continues from earlier calls."""
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        hidden, cache, all_hidden = self.model(
            input_ids, attention_mask=attention_mask, doc_start=doc_start, inputs_embeds=inputs_embeds,
            cache=cache, use_cache=use_cache or cache is not None, output_hidden_states=bool(output_hidden_states),
        )
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        if not return_dict:
            out = (logits, cache, all_hidden)
            return ((loss,) + out) if loss is not None else out
        return HGRNCausalLMOutput(loss=loss, logits=logits, cache=cache, hidden_states=all_hidden)

    # generate(): the cache travels in model_kwargs["cache"]; each step feeds only the tokens not yet seen.
    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, inputs_embeds=None,
                                      use_cache=True, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        inputs = {"cache": cache, "attention_mask": attention_mask, "use_cache": use_cache}
        if cache is not None and cache.seen_tokens > 0:
            inputs["input_ids"] = input_ids[:, cache.seen_token_ids:]
        elif inputs_embeds is not None:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids
        for key in ("logits_to_keep", "output_hidden_states"):
            if kwargs.get(key) is not None:
                inputs[key] = kwargs[key]
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens=1, **kwargs):
        model_kwargs["cache"] = outputs.get("cache")
        mask = model_kwargs.get("attention_mask")
        if mask is not None:
            model_kwargs["attention_mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], num_new_tokens)], dim=-1)
        return model_kwargs


__all__ = ["HGRNCache", "HGRNForCausalLM", "HGRNModel", "HGRNPreTrainedModel", "linear_recurrence"]
