"""The self-contained HF model on its own: the scan, cached decoding, left-padded generation, loss, gradients,
and the save_pretrained / from_pretrained(trust_remote_code) round trip."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hgrn_megatron.export.hf_files.configuration_hgrn import HGRNConfig
from hgrn_megatron.export.hf_files.modeling_hgrn import HGRNForCausalLM, linear_recurrence

EOS = 2


def tiny_model(seed: int = 0, **overrides) -> HGRNForCausalLM:
    """A random tiny model whose lower bounds, θ and norms are off their initial values."""
    cfg = HGRNConfig(**{"vocab_size": 97, "hidden_size": 32, "num_hidden_layers": 3, "intermediate_size": 48,
                        "bos_token_id": 1, "eos_token_id": EOS, "pad_token_id": 3, **overrides})
    torch.manual_seed(seed)
    model = HGRNForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def scan_loop(a, b, h0):
    """float64 reference of h_t = a_t h_{t-1} + b_t."""
    h, out = h0.to(torch.complex128 if a.is_complex() else torch.float64), []
    for t in range(a.shape[1]):
        h = a[:, t].to(h.dtype) * h + b[:, t].to(h.dtype)
        out.append(h)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("complex_", [True, False], ids=["complex", "real"])
@pytest.mark.parametrize("length", [1, 63, 64, 65, 200, 4097])
def test_linear_recurrence_matches_loop(length, complex_):
    g = torch.Generator().manual_seed(length)
    B, D = 2, 5
    modulus = torch.rand(B, length, D, generator=g) ** 0.05  # decays close to 1, as trained gates are
    if complex_:
        a = torch.polar(modulus, torch.randn(B, length, D, generator=g))
        b = torch.complex(torch.randn(B, length, D, generator=g), torch.randn(B, length, D, generator=g))
        h0 = torch.complex(torch.randn(B, D, generator=g), torch.randn(B, D, generator=g))
    else:
        a, b, h0 = modulus, torch.randn(B, length, D, generator=g), torch.randn(B, D, generator=g)
    expected = scan_loop(a, b, h0)
    got = linear_recurrence(a, b, h0)
    assert (got - expected).abs().max().item() <= 2e-5 * expected.abs().max().item()


@pytest.mark.parametrize("overrides", [
    dict(variant="complex"),
    dict(variant="real", expand_ratio=2, mixer_norm="rmsnorm"),
    dict(variant="complex", reset_at_document_boundary=True, output_gate=False, use_lower_bound=False),
], ids=["complex", "real-x2-rmsnorm", "complex-reset-nogate-nobound"])
def test_step_by_step_decoding_equals_full_forward(overrides):
    model = tiny_model(**overrides)
    ids = torch.randint(4, 97, (2, 30), generator=torch.Generator().manual_seed(1))
    ids[:, 11] = EOS
    with torch.no_grad():
        full = model(ids).logits
        cache, steps = None, []
        for t in range(ids.shape[1]):
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            cache, _ = out.cache, steps.append(out.logits)
        # chunked prefill continues the same state
        first = model(ids[:, :17], use_cache=True)
        rest = model(ids[:, 17:], cache=first.cache, use_cache=True)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], dim=1), full, rtol=1e-5, atol=1e-5)


def test_document_reset_makes_the_next_document_independent():
    model = tiny_model(reset_at_document_boundary=True)
    doc = torch.randint(4, 97, (1, 9), generator=torch.Generator().manual_seed(2))
    for prefix_len in (5, 12):
        prefix = torch.randint(4, 97, (1, prefix_len))
        ids = torch.cat([prefix, torch.tensor([[EOS]]), doc], dim=1)
        with torch.no_grad():
            after = model(ids).logits[:, -doc.shape[1]:]
            alone = model(doc).logits
        torch.testing.assert_close(after, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["complex", "real"])
def test_left_padded_batch_generates_like_single_prompts(variant):
    model = tiny_model(variant=variant)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 97, (n,), generator=g) for n in (9, 4, 6)]
    width = max(len(p) for p in prompts)
    batch = torch.full((len(prompts), width), 3)
    mask = torch.zeros_like(batch)
    for row, p in enumerate(prompts):
        batch[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None)
    for row, p in enumerate(prompts):
        single = model.generate(p[None], max_new_tokens=6, do_sample=False, eos_token_id=None)
        assert torch.equal(out[row, width - len(p):], single[0])


def test_generate_uses_the_recurrent_cache():
    """generate() feeds one token per step after the prompt (it never re-reads the context)."""
    model = tiny_model()
    seen = []
    handle = model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    model.generate(torch.randint(4, 97, (1, 10)), max_new_tokens=5, do_sample=False, eos_token_id=None)
    handle.remove()
    assert seen == [10, 1, 1, 1, 1]


def test_generate_from_inputs_embeds_continues_like_from_ids():
    """generate(inputs_embeds=...) returns only the new tokens, and they are those generate(input_ids) adds."""
    model = tiny_model()
    prompt = torch.randint(4, 97, (2, 7), generator=torch.Generator().manual_seed(4))
    from_ids = model.generate(prompt, max_new_tokens=5, do_sample=False, eos_token_id=None)
    embeds = model.get_input_embeddings()(prompt)
    from_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert torch.equal(from_embeds, from_ids[:, 7:])


def test_labels_give_the_mean_next_token_loss_and_gradients_reach_every_parameter():
    model = tiny_model().train()
    ids = torch.randint(4, 97, (2, 16))
    labels = ids.clone()
    labels[0, 5] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_save_pretrained_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(variant="real", expand_ratio=2, tie_word_embeddings=True)
    model.config.register_for_auto_class()
    model.register_for_auto_class("AutoModelForCausalLM")
    model.save_pretrained(tmp_path / "a")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a", trust_remote_code=True).eval()
    loaded.save_pretrained(tmp_path / "b")  # the remote-code class saves its own code again
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "b", trust_remote_code=True).eval()
    ids = torch.randint(4, 97, (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(again(ids).logits, expected, rtol=0, atol=0)
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("variant", ["complex", "real"])
def test_framework_kernel_path_matches_the_torch_scan(monkeypatch, variant):
    """The glue to `hgrn_megatron.kernels.hgrn_scan` (taken on CUDA) gives the torch scan's outputs: layouts,
    complex views, initial state and resets. Here the kernel entry point runs its CPU path."""
    from hgrn_megatron.export.hf_files import modeling_hgrn

    assert modeling_hgrn._framework_scan is not None
    model = tiny_model(variant=variant, reset_at_document_boundary=True)
    ids = torch.randint(4, 97, (2, 20), generator=torch.Generator().manual_seed(5))
    ids[:, 7] = EOS
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding

    def run():
        full = model(ids).logits
        padded = model(ids, attention_mask=mask).logits[1, 5:]
        first = model(ids[:, :12], use_cache=True)
        return full, padded, model(ids[:, 12:], cache=first.cache, use_cache=True).logits

    with torch.no_grad():
        expected = run()
        monkeypatch.setattr(modeling_hgrn.HGRNMixer, "_use_framework_kernel",
                            lambda self, x, pad_mask, state: state is None or pad_mask is None)
        got = run()
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
