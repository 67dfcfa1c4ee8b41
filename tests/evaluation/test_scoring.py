"""Log-likelihoods as the harness receives them, against a direct forward of the exported model (log-softmax
sums computed here), and prefix-state reuse against scoring whole sequences."""
from __future__ import annotations

import pytest
import torch

from hgrn_megatron.evaluation.hf_model import stateful_hf_model
from hgrn_megatron.harness.scoring import score_pairs
from tests.evaluation.conftest import REPO, TASK_DIR

pytestmark = pytest.mark.distributed  # the fixtures train with real gloo ranks


def direct_score(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """One unbatched forward of `context + continuation`, no state, no padding: sum of log p(continuation)."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids).logits.double(), dim=-1)[0]
    positions = torch.arange(len(context) - 1, len(context) + len(continuation) - 1)
    target = torch.tensor(continuation)
    picked = log_probs[positions, target]
    return picked.sum().item(), bool((log_probs[positions].argmax(-1) == target).all())


def split_request(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Causal scoring's token split: trailing context spaces go to the continuation; the whole text is encoded
    and split at the context's length; an empty context is EOS."""
    if not context:
        return [tokenizer.eos_id], tokenizer.encode(continuation)
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole, ctx = tokenizer.encode(stripped + continuation), tokenizer.encode(stripped)
    return ctx, whole[len(ctx):]


def test_harness_loglikelihoods_equal_a_direct_forward(tp1_hf_model, monkeypatch):
    from hgrn_megatron.harness.tasks import run_tasks

    model, tokenizer = tp1_hf_model
    monkeypatch.chdir(REPO)  # the task's data_files path is relative to the repository root
    results = run_tasks(stateful_hf_model(model), tokenizer, ["tiny_qa"], task_dir=TASK_DIR, limit=10,
                        batch_size=4, log_samples=True)
    samples = results["samples"]["tiny_qa"]
    assert len(samples) == 10
    checked = 0
    for sample in samples:
        assert len(sample["arguments"]) == len(sample["doc"]["choices"]) >= 2
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            got_lp, got_greedy = resp[0]
            want_lp, want_greedy = direct_score(model, *split_request(tokenizer, context, continuation))
            assert abs(got_lp - want_lp) <= 1e-4 * max(1.0, abs(want_lp)), (context, continuation)
            assert got_greedy == want_greedy
            checked += 1
    assert checked == results["hgrn_throughput"]["loglikelihood_requests"]
    acc = results["results"]["tiny_qa"]["acc,none"]
    # accuracy recomputed from the log-likelihoods: the harness's argmax over each item's choices
    picks = [max(range(len(s["resps"])), key=lambda k: s["resps"][k][0][0]) for s in samples]
    assert acc == pytest.approx(sum(p == s["doc"]["label"] for p, s in zip(picks, samples)) / len(samples))


def request_pairs(tokenizer) -> list[tuple[list[int], list[int]]]:
    """Shared contexts (several continuations each), continuations of one and of many tokens, contexts of very
    different lengths (left padding), an EOS context (the model resets after it), a context with an EOS
    inside, and a long document."""
    enc = tokenizer.encode
    eos = tokenizer.eos_id
    story = enc("And God said, Let there be light: and there was light. And God saw the light, that it was good")
    pairs = []
    for context in ["The sun rises in the", "Q: What do cows give us? A:", "It"]:
        for choice in [" east", " milk and cheese every single morning", " a", " light that was good"]:
            pairs.append((enc(context), enc(choice)))
    pairs.append(([eos], enc("In the beginning")))
    pairs.append((enc("First document.") + [eos] + enc("Second"), enc(" document begins")))
    pairs.append((story[:5], story[5:]))
    pairs.append((story[:-3], story[-3:]))
    return pairs


@pytest.mark.parametrize("batch_size,chunk_tokens", [(3, 2048), (16, 7)])
def test_prefix_state_reuse_equals_whole_sequences_and_direct_forward(tp1_hf_model, batch_size, chunk_tokens):
    model, tokenizer = tp1_hf_model
    pairs = request_pairs(tokenizer)
    lm = stateful_hf_model(model)
    lm.chunk_tokens = chunk_tokens  # 7: contexts and continuations cross chunk borders, carrying the state
    reused = score_pairs(lm, pairs, batch_size=batch_size, reuse_prefix=True)
    whole = score_pairs(lm, pairs, batch_size=batch_size, reuse_prefix=False)
    direct = [direct_score(model, ctx, cont) for ctx, cont in pairs]
    for (lp_r, g_r), (lp_w, g_w), (lp_d, g_d) in zip(reused, whole, direct):
        assert abs(lp_r - lp_d) <= 1e-4 * max(1.0, abs(lp_d))
        assert abs(lp_w - lp_d) <= 1e-4 * max(1.0, abs(lp_d))
        assert g_r == g_w == g_d


def test_scoring_counts_each_shared_context_once(tp1_hf_model):
    """Prefix reuse runs every distinct context once: positions fed to the model are counted."""
    model, tokenizer = tp1_hf_model
    pairs = request_pairs(tokenizer)
    lm = stateful_hf_model(model)
    fed = []
    forward = lm.forward
    lm.forward = lambda ids, mask, state: (fed.append(int(ids.shape[0] * ids.shape[1])), forward(ids, mask, state))[1]
    score_pairs(lm, pairs, batch_size=1, reuse_prefix=True)
    contexts = {tuple(c) for c, _ in pairs}
    expected = sum(len(c) for c in contexts) + sum(len(cont) - 1 for _, cont in pairs)
    assert sum(fed) == expected < sum(len(c) + len(cont) - 1 for c, cont in pairs)


def test_greedy_generation_equals_transformers_generate(tp1_hf_model):
    from lm_eval.api.instance import Instance

    from hgrn_megatron.harness.lm import HGRNHarnessLM

    model, tokenizer = tp1_hf_model
    lm = HGRNHarnessLM(stateful_hf_model(model), tokenizer)
    context = "And God said"
    request = Instance("generate_until", {}, (context, {"until": ["\n\n"], "max_gen_toks": 12}), 0)
    text = lm.generate_until([request])[0]
    ids = torch.tensor([tokenizer.encode(context)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_id)
    reference = tokenizer.decode(out[0, ids.shape[1]:].tolist()).split("\n\n")[0]
    assert text == reference


def test_pairs_without_tokens_are_refused(tp1_hf_model):
    model, _ = tp1_hf_model
    with pytest.raises(ValueError, match="pair 1"):
        score_pairs(stateful_hf_model(model), [([5], [6]), ([5], [])])


def test_rolling_loglikelihood_scores_the_whole_document_after_eos(tp1_hf_model):
    """Perplexity tasks: no context window, one pass from EOS (chunked here, carrying the state)."""
    from lm_eval.api.instance import Instance

    from hgrn_megatron.harness.lm import HGRNHarnessLM

    model, tokenizer = tp1_hf_model
    stateful = stateful_hf_model(model)
    stateful.chunk_tokens = 8
    lm = HGRNHarnessLM(stateful, tokenizer)
    text = "In the beginning God created the heaven and the earth. And the earth was without form, and void."
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0),
                                    Instance("loglikelihood_rolling", {}, ("",), 1)])
    want, _ = direct_score(model, [tokenizer.eos_id], tokenizer.encode(text))
    assert len(tokenizer.encode(text)) > 2 * stateful.chunk_tokens
    assert got[0] == pytest.approx(want, rel=1e-5) and got[1] == 0.0
