"""The batch contract: a loader micro-batch, and the inputs, labels and document starts the model takes."""
from __future__ import annotations

import torch

from hgrn_megatron.pretrain.data import TrainLoader, build_validation_batches, label_sources, model_inputs
from tests.data.data_harness import ASSETS, data_config

S, MB = 24, 3


def test_labels_are_the_next_token_of_each_input(corpus, tokenizer):
    with TrainLoader(data_config(corpus["glob"]), tokenizer, S, MB, 0, 1) as loader:
        batch = next(loader)
    assert batch["tokens"].dtype == torch.long and batch["tokens"].shape == (MB, S + 1)
    assert batch["doc_start"].dtype == torch.bool and batch["doc_start"].shape == (MB, S + 1)
    x = model_inputs(batch, device="cpu")
    assert x.input_ids.shape == x.labels.shape == x.doc_start.shape == (MB, S)
    for row in range(MB):
        for t in range(S):  # element by element, against the sample as the loader packed it
            assert x.input_ids[row, t] == batch["tokens"][row, t]
            assert x.labels[row, t] == batch["tokens"][row, t + 1]
            assert x.doc_start[row, t] == batch["doc_start"][row, t]
    bare = model_inputs(batch["tokens"])  # a token tensor alone (benchmarks, tests): no document starts
    assert bare.doc_start is None and torch.equal(bare.labels, x.labels)


def test_validation_labels_carry_their_sources(tokenizer):
    val = str(ASSETS / "pile-mini" / "val.jsonl.zst")
    out = build_validation_batches(data_config(val, valid_shards=[val], valid_samples=4), tokenizer, S, 2)
    for batch in out["batches"]:
        x, sources = model_inputs(batch), label_sources(batch)
        assert sources.shape == x.labels.shape
        assert torch.equal(sources, batch["source_ids"][:, 1:])  # label t is token t + 1, and so is its source
