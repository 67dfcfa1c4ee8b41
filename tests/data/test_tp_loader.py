"""One loader per tensor-parallel group: the first TP rank loads, the group receives identical batches."""
from __future__ import annotations

import numpy as np

from hgrn_megatron.pretrain.data import DataError, TrainLoader
from hgrn_megatron.testing.distributed import run_distributed
from hgrn_megatron.tokenizer import Tokenizer
from tests.data.data_harness import ASSETS, data_config, record, write_corpus, write_zst

S, MB, STEPS = 32, 2, 5


def _group_ranks(cfg):
    import torch.distributed as dist

    from hgrn_megatron.pretrain.data.tp_loader import GroupLoader

    tokenizer = Tokenizer.load(ASSETS / "tokenizer")
    loader = GroupLoader(lambda: TrainLoader(cfg, tokenizer, S, MB, 0, 1), None, S, MB, cfg.lanes)
    try:
        batches = [next(loader) for _ in range(STEPS)]
        error = None
    except DataError as err:
        batches, error = [], str(err)
    stats = loader.stats()
    loader.close()
    return {"rank": dist.get_rank(), "has_loader": loader.loader is not None, "error": error,
            "tokens": [b["tokens"].numpy() for b in batches], "doc_start": [b["doc_start"].numpy() for b in batches],
            "tokenized": stats.get("documents_tokenized", 0), "state": loader.state_dict()}


def test_the_tp_group_gets_the_first_ranks_batches_and_tokenizes_once(tmp_path, tokenizer):
    cfg = data_config(write_corpus(tmp_path)["glob"])
    with TrainLoader(cfg, tokenizer, S, MB, 0, 1) as plain:
        ref = [next(plain) for _ in range(STEPS)]
        ref_tokenized = plain.stats()["documents_tokenized"]
    results = run_distributed(_group_ranks, world_size=2, args=(cfg,), timeout=120)
    for res in results:
        assert res["error"] is None
        for got, want, starts in zip(res["tokens"], ref, res["doc_start"]):
            assert np.array_equal(got, want["tokens"].numpy()) and np.array_equal(starts, want["doc_start"].numpy())
    first, other = results
    assert first["has_loader"] and not other["has_loader"]
    assert first["tokenized"] == ref_tokenized > 0 and other["tokenized"] == 0  # each document once per replica
    assert first["state"]["consumed_samples"] == STEPS * MB and other["state"] is None


def test_a_loader_failure_on_the_first_rank_reaches_the_others(tmp_path):
    write_zst(tmp_path / "bad.jsonl.zst", [b"{nope", record("")])
    results = run_distributed(_group_ranks, world_size=2, args=(data_config(str(tmp_path / "bad.jsonl.zst")),),
                              timeout=120)
    assert "found no usable document" in results[0]["error"]
    assert "the data loader on rank 0 (the first of this tensor-parallel group) failed" in results[1]["error"]
