"""Document resets: with `reset_at_document_boundary`, the tokens after a document start produce exactly the
outputs they would produce as a fresh sequence (for the HGRU and for the attention baseline's block mask)."""
import pytest
import torch

from hgrn_megatron.testing.distributed import run_distributed
from tests.model.model_harness import max_rel_diff, packed_vs_fresh, tiny_config

pytestmark = pytest.mark.distributed


CASES = {
    "hgrn-complex": dict(variant="complex"),
    "hgrn-real": dict(variant="real", expand_ratio=2, output_gate=False, mixer_norm="rmsnorm"),
    "attention": dict(mixer="attention"),
}


def test_tokens_after_a_document_start_see_a_fresh_sequence():
    names = list(CASES)
    cfgs = [tiny_config(reset_at_document_boundary=True, **CASES[n]) for n in names]
    cfgs.append(tiny_config(reset_at_document_boundary=False, **CASES["hgrn-complex"]))
    results = run_distributed(packed_vs_fresh, world_size=1, args=(cfgs,), timeout=120)[0]
    for name, r in zip(names, results):
        assert max_rel_diff(r["packed"], r["fresh"]) < 1e-5, name
        # Without the mask the previous document leaks in: the equality above is not automatic.
        assert max_rel_diff(r["packed_without_mask"], r["fresh"]) > 1e-3, name
    # reset_at_document_boundary off: doc_start is ignored, one stream per sequence (as in the paper).
    off = results[-1]
    torch.testing.assert_close(off["packed"], off["packed_without_mask"], rtol=0, atol=0)
    assert max_rel_diff(off["packed"], off["fresh"]) > 1e-3
