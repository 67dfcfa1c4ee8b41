"""Document resets: with `reset_at_document_boundary`, the tokens after a document start produce exactly the
outputs they would produce as a fresh sequence (for the HGRU and for the attention baseline's block mask)."""
import pytest
import torch

from hgrn_megatron.testing.distributed import run_distributed
from tests.model.model_harness import VOCAB, init_model_parallel, max_rel_diff, tiny_config

pytestmark = pytest.mark.distributed

PREFIX, DOC = 11, 13  # a previous document's tail, then a new document


def _packed_vs_fresh(cfgs):
    """For each config (same seed, so the same weights): logits of [prefix | doc] with a document start at
    PREFIX, of [prefix | doc] without one, and of doc alone."""
    from hgrn_megatron.model import build_model

    init_model_parallel()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (2, PREFIX + DOC), generator=g)
    doc_start = torch.zeros_like(tokens, dtype=torch.bool)
    doc_start[:, 0] = doc_start[:, PREFIX] = True
    out = []
    for cfg in cfgs:
        torch.manual_seed(0)
        model = build_model(cfg, VOCAB)
        with torch.no_grad():
            out.append({
                "packed": model(tokens, doc_start=doc_start)[:, PREFIX:],
                "packed_without_mask": model(tokens)[:, PREFIX:],
                "fresh": model(tokens[:, PREFIX:].contiguous(), doc_start=doc_start[:, PREFIX:].contiguous()),
            })
    return out


CASES = {
    "hgrn-complex": dict(variant="complex"),
    "hgrn-real": dict(variant="real", expand_ratio=2, output_gate=False, mixer_norm="rmsnorm"),
    "attention": dict(mixer="attention"),
}


def test_tokens_after_a_document_start_see_a_fresh_sequence():
    names = list(CASES)
    cfgs = [tiny_config(reset_at_document_boundary=True, **CASES[n]) for n in names]
    cfgs.append(tiny_config(reset_at_document_boundary=False, **CASES["hgrn-complex"]))
    results = run_distributed(_packed_vs_fresh, world_size=1, args=(cfgs,), timeout=120)[0]
    for name, r in zip(names, results):
        assert max_rel_diff(r["packed"], r["fresh"]) < 1e-5, name
        # Without the mask the previous document leaks in: the equality above is not automatic.
        assert max_rel_diff(r["packed_without_mask"], r["fresh"]) > 1e-3, name
    # reset_at_document_boundary off: doc_start is ignored, one stream per sequence (as in the paper).
    off = results[-1]
    torch.testing.assert_close(off["packed"], off["packed_without_mask"], rtol=0, atol=0)
    assert max_rel_diff(off["packed"], off["fresh"]) > 1e-3
