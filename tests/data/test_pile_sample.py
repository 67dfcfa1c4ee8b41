"""On the larger Pile-format sample when it is present next to the repository (skipped otherwise)."""
from __future__ import annotations

import numpy as np
import pytest

from hgrn_megatron.corpus.records import RecordParser, iter_documents
from tests.data.data_harness import SHARED_PILE, data_config, run_ranks

pytestmark = pytest.mark.skipif(not SHARED_PILE.is_dir(), reason="the Pile-format sample is not next to the repo")


def test_real_documents_round_trip_through_the_shipped_tokenizer(tokenizer):
    """Code, documentation and books that the small tokenizer never saw: byte fallback keeps them exact."""
    docs = []
    for _, doc in iter_documents(SHARED_PILE / "val.jsonl.zst", RecordParser()):
        docs.append(doc)
    assert len({d.source for d in docs}) >= 8
    for doc in docs:
        assert tokenizer.decode(tokenizer.encode(doc.text)) == doc.text


def test_real_shards_give_the_same_sequence_at_dp_1_and_2(tokenizer):
    cfg = data_config(str(SHARED_PILE / "0[01].jsonl.zst"), lanes=4)
    ref, ref_starts, _, stats = run_ranks(cfg, tokenizer, 256, 2, 1, 12)
    got, got_starts, _, _ = run_ranks(cfg, tokenizer, 256, 2, 2, 6, workers=1)
    assert np.array_equal(ref, got) and np.array_equal(ref_starts, got_starts)
    assert stats[0]["skipped_total"] == 0 and stats[0]["documents"] >= 4
