"""Scoring shared by data-parallel ranks (`harness.split`) on real gloo ranks, against one process scoring
everything: the results come back in the harness's order, and under `lockstep` every replica runs the same
number of forwards although their shares differ (a forward that holds a collective, as ZeRO-3's parameter
gathers do, would otherwise wait forever on the replica that finished first)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from hgrn_megatron.harness.scorer import LocalScorer
from hgrn_megatron.harness.scoring import StatefulLM
from hgrn_megatron.harness.split import ReplicaLayout, SplitScorer
from hgrn_megatron.testing.distributed import run_distributed
from tests.evaluation.conftest import REPO

pytestmark = pytest.mark.distributed
TOKENIZER = REPO / "tests" / "assets" / "tokenizer" / "tokenizer.model"


def tiny_model(vocab: int, collective: bool, forwards: list[int]) -> StatefulLM:
    """A seeded embedding -> tanh -> linear LM with a running mean over positions (so every earlier token
    counts); with `collective`, each forward all-reduces a number over the world, as ZeRO-3's gathers do."""
    torch.manual_seed(11)
    emb, head = torch.nn.Embedding(vocab, 16), torch.nn.Linear(16, vocab)

    def forward(ids, mask, state):
        forwards.append(int(ids.numel()))
        if collective:
            dist.all_reduce(torch.ones(1))
        x = torch.tanh(emb(ids)).cumsum(dim=1) / torch.arange(1, ids.shape[1] + 1)[None, :, None]
        return head(x), None

    return StatefulLM(forward=forward, vocab_size=vocab - 3)  # the last rows play the TP padding


def requests(tok):
    pairs = [(tok.encode(c), tok.encode(a)) for c in ["The sun rises in the", "Cows give", "It"]
             for a in [" east", " milk and cheese", " a"]]
    pairs.append(([tok.eos_id], tok.encode("In the beginning")))  # 10 pairs: dealt 5 / 5, unequal tokens
    pairs.append((tok.encode("One more"), tok.encode(" odd one")))  # 11: dealt 6 / 5
    gens = [(tok.encode("And God said"), ["\n"], 5), (tok.encode("Light"), [], 3), (tok.encode("x"), ["a"], 4)]
    return pairs, gens


def _rank(dp_size: int, lockstep: bool):
    from hgrn_megatron.tokenizer import Tokenizer

    tok = Tokenizer.load(TOKENIZER)
    rank, forwards = dist.get_rank(), []
    model = tiny_model(tok.vocab_size, collective=lockstep, forwards=forwards)
    layout = ReplicaLayout(dp_rank=rank if dp_size > 1 else 0, dp_size=dp_size,
                           reports=dp_size > 1 or rank == 0, lockstep=lockstep)
    beats = []
    scorer = SplitScorer(LocalScorer(model, tok, batch_size=1, reuse_prefix=False), layout,
                         progress=lambda: beats.append(1))
    pairs, gens = requests(tok)
    if rank != 0:
        scorer.serve()
        return {"forwards": len(forwards), "beats": len(beats)}
    try:
        out = {"loglikelihood": scorer.loglikelihood(pairs), "generate": scorer.generate(gens)}
    finally:
        scorer.stop()
    return {**out, "forwards": len(forwards), "beats": len(beats)}


@pytest.mark.parametrize("dp_size,lockstep", [(2, True), (2, False), (1, False)])
def test_split_scoring_equals_one_process(dp_size, lockstep):
    """(2, True): two replicas with a collective in every forward; (2, False): two replicas, plain forwards;
    (1, False): two ranks of one replica (as tensor-parallel shards), only the first reports."""
    from hgrn_megatron.tokenizer import Tokenizer

    results = run_distributed(_rank, world_size=2, args=(dp_size, lockstep), timeout=120)
    tok = Tokenizer.load(TOKENIZER)
    pairs, gens = requests(tok)
    reference = LocalScorer(tiny_model(tok.vocab_size, collective=False, forwards=[]), tok, batch_size=1,
                            reuse_prefix=False)
    want_ll, want_gen = reference.loglikelihood(pairs), reference.generate(gens)
    got = results[0]
    assert [g for _, g in got["loglikelihood"]] == [g for _, g in want_ll]
    assert [lp for lp, _ in got["loglikelihood"]] == pytest.approx([lp for lp, _ in want_ll], rel=1e-12)
    assert got["generate"] == want_gen and any(want_gen)
    assert results[0]["beats"] == results[1]["beats"] == 2  # one per call, on every rank
    if lockstep:  # 6 and 5 requests, one forward each, plus generation's forwards: equal counts by filler
        assert results[0]["forwards"] == results[1]["forwards"]
    if dp_size == 2 and not lockstep:  # the shares differ: without lockstep the counts differ too
        assert results[0]["forwards"] != results[1]["forwards"]
