"""Mixture weights (uses per epoch, per source and per shard group) and the seeded shard order."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from hgrn_megatron.pretrain.data import DataConfig
from hgrn_megatron.pretrain.data.mixture import Mixture
from hgrn_megatron.pretrain.data.stream import UnitTable
from tests.data.data_harness import data_config, record, run_ranks, write_zst


def test_weights_are_uses_per_epoch():
    m = Mixture(num_shards=4, seed=7, shard_weights=[1, 1, 1, 0.5], source_weights={"A": 2.0, "B": 0.3, "C": 0})
    assert m.passes_per_epoch == 2
    uses = Counter()
    for epoch in range(3):
        for p in range(m.passes_per_epoch):
            for shard in range(4):
                for line in range(400):
                    for source in ("A", "B", "C", "D"):
                        uses[(epoch, shard, source)] += m.includes(epoch * 2 + p, shard, line, source)
    for epoch in range(3):
        assert uses[(epoch, 0, "A")] == 800 and uses[(epoch, 0, "C")] == 0 and uses[(epoch, 0, "D")] == 400
        assert 90 < uses[(epoch, 0, "B")] < 150  # 0.3 of 400, seeded
        assert uses[(epoch, 3, "A")] == 400  # 0.5 x 2.0
        assert 150 < uses[(epoch, 3, "D")] < 250  # 0.5
    # Fractional choices are fixed by (seed, epoch, shard, line): the same on every call, different per epoch.
    again = Mixture(4, 7, [1, 1, 1, 0.5], {"A": 2.0, "B": 0.3, "C": 0})
    picks = [[m.includes(2 * e, 0, line, "B") for line in range(400)] for e in range(2)]
    assert picks[0] == [again.includes(0, 0, line, "B") for line in range(400)]
    assert picks[0] != picks[1]


def test_unit_order_is_a_seeded_reshuffle_per_pass(tmp_path):
    paths = [write_zst(tmp_path / f"{i}.jsonl.zst", [record(f"doc {i}")]) for i in range(6)]
    table = UnitTable(paths, seed=3)
    orders = [table.order(p) for p in range(8)]
    assert all(sorted(o) == list(range(6)) for o in orders)
    assert len({tuple(o) for o in orders}) > 4
    assert orders == [UnitTable(paths, 3).order(p) for p in range(8)]
    assert orders != [UnitTable(paths, 4).order(p) for p in range(8)]


def test_source_weights_through_the_loader(corpus, tokenizer):
    cfg = data_config(corpus["glob"], source_weights={"Source-C": 0.0, "Source-A": 2.0})
    _, _, _, stats = run_ranks(cfg, tokenizer, 32, 2, 2, 40)
    docs = Counter()
    for s in stats:
        docs.update(s["documents_by_source"])
    assert docs["Source-C"] == 0 and docs["Source-A"] > 0 and docs["Source-B"] > 0
    assert sum(s["dropped_by_source"].get("Source-C", 0) for s in stats) > 0


def test_shard_group_weights(tmp_path, tokenizer):
    heavy = [record(f"heavy document {i} " + "word " * 20, "S") for i in range(6)]
    light = [record(f"light document {i} " + "word " * 20, "S") for i in range(6)]
    write_zst(tmp_path / "heavy.jsonl.zst", heavy)
    write_zst(tmp_path / "light.jsonl.zst", light)
    write_zst(tmp_path / "off.jsonl.zst", [record(f"dropped document {i} " + "word " * 20, "S") for i in range(6)])
    cfg = DataConfig.build({
        "train_groups": {
            "heavy": {"shards": [str(tmp_path / "heavy.jsonl.zst")], "weight": 3.0},
            "light": {"shards": [str(tmp_path / "light.jsonl.zst")], "weight": 1.0},
            "off": {"shards": [str(tmp_path / "off.jsonl.zst")], "weight": 0.0},
        },
        "lanes": 1, "num_workers": 0,
    })
    tokens, _, _, _ = run_ranks(cfg, tokenizer, 16, 1, 1, 120)
    stream = np.concatenate([tokens[0], *[t[1:] for t in tokens[1:]]])
    text = tokenizer.decode([t for t in stream.tolist() if t != tokenizer.eos_id])
    assert "dropped document" not in text
    # One epoch is three passes: heavy documents in all three, light ones in the first only. The text runs up to
    # the light shard's turn in pass 3 (the next epoch), which may come after the heavy shard's.
    epoch_text = text[: text.index("light document 0", text.index("light document 5"))]
    paths = sorted(tmp_path.glob("*.jsonl.zst"))  # heavy, light, off: the pipeline's shard indices
    pass3 = [UnitTable(paths, cfg.seed).units[u].shard for u in UnitTable(paths, cfg.seed).order(3)]
    heavy_first = pass3.index(0) < pass3.index(1)
    assert epoch_text.count("heavy document 0 ") == 3 + heavy_first and epoch_text.count("light document 0 ") == 1


def test_heaviest_source_outside_the_heaviest_group_leaves_empty_passes_not_an_error(tmp_path, tokenizer):
    """Group weight 2 with source weight 3 in the other (weight-1) group: 6 passes per epoch, of which only the
    first 3 include anything. The lane reads through the empty ones and keeps producing samples."""
    write_zst(tmp_path / "g2.jsonl.zst", [record(f"grouped document {i} " + "word " * 20, "Web") for i in range(4)])
    write_zst(tmp_path / "g1.jsonl.zst", [record(f"wiki document {i} " + "word " * 20, "Wiki") for i in range(4)])
    cfg = DataConfig.build({
        "train_groups": {"two": {"shards": [str(tmp_path / "g2.jsonl.zst")], "weight": 2.0},
                         "one": {"shards": [str(tmp_path / "g1.jsonl.zst")], "weight": 1.0}},
        "source_weights": {"Wiki": 3.0}, "lanes": 1, "num_workers": 0,
    })
    tokens, _, _, _ = run_ranks(cfg, tokenizer, 16, 1, 1, 120)  # 120 x 16 tokens: about three epochs
    stream = np.concatenate([tokens[0], *[t[1:] for t in tokens[1:]]])
    text = tokenizer.decode([t for t in stream.tolist() if t != tokenizer.eos_id])
    first_epoch = text[: text.index("wiki document 0", text.index("wiki document 3"))]  # up to the 2nd copy
    assert first_epoch.count("grouped document 0 ") <= 2 and text.count("wiki document 0 ") >= 4


def test_bad_weights_and_overlapping_groups_are_config_errors(tmp_path):
    from hgrn_megatron.config_base import ConfigError

    write_zst(tmp_path / "a.jsonl.zst", [record("x")])
    with pytest.raises(ConfigError, match=r"source_weights.Wiki: weight must be >= 0"):
        DataConfig.build({"train_shards": [str(tmp_path)], "source_weights": {"Wiki": -1}})
    with pytest.raises(ConfigError, match=r"set data.train_shards"):
        DataConfig.build({})
    cfg = DataConfig.build({"train_shards": [str(tmp_path)], "train_groups": {"g": {"shards": [str(tmp_path)]}}})
    with pytest.raises(ConfigError, match=r"data.train_groups.g.shards: shard .*a.jsonl.zst is also listed in data.tr"):
        cfg.resolve_train()
