"""Offline task preparation: a harness YAML (with an include chain and helper code) and its data become a
self-contained folder that runs from any working directory, data read from local JSON Lines."""
from __future__ import annotations

import json

import pytest

from hgrn_megatron.evaluation.hf_model import stateful_hf_model
from hgrn_megatron.evaluation.offline_tasks import localize_task
from tests.evaluation.conftest import REPO, TASK_DIR

pytestmark = pytest.mark.distributed  # the model fixture trains with real gloo ranks


def test_a_localized_task_with_includes_runs_from_anywhere(tp1_hf_model, tmp_path, monkeypatch):
    from hgrn_megatron.harness.tasks import run_tasks

    source = tmp_path / "harness-style"
    source.mkdir()
    base = (TASK_DIR / "tiny_qa.yaml").read_text().replace("task: tiny_qa", "task: base_qa")
    (source / "base.yaml").write_text(base)  # its data_files path is relative to the repository root
    (source / "prompts.py").write_text("def doc_to_text(doc):\n    return 'Question: ' + doc['question'] + '\\nAnswer:'\n")
    (source / "leaf_qa.yaml").write_text("include: base.yaml\ntask: leaf_qa\ndoc_to_text: !function prompts.doc_to_text\n")

    monkeypatch.chdir(REPO)  # where the source task's relative data path resolves (as on a machine online)
    out = tmp_path / "eval-tasks"
    dest = localize_task(source / "leaf_qa.yaml", out, str(out))
    assert sorted(p.name for p in dest.iterdir()) == ["leaf_qa.yaml", "prompts.py", "test.jsonl"]
    assert "include:" not in (dest / "leaf_qa.yaml").read_text()
    rows = [json.loads(line) for line in (dest / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 36 and rows[1]["choices"] == ["weight", "Celsius", "Kelvin"]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model, tokenizer = tp1_hf_model
    results = run_tasks(stateful_hf_model(model), tokenizer, ["leaf_qa"], task_dir=out, limit=3, log_samples=True)
    samples = results["samples"]["leaf_qa"]
    assert len(samples) == 3
    # the leaf's prompt (helper code) overrides the included one; the documents come from the local copy
    assert samples[1]["arguments"][0][0] == "Question: Water freezes at a temperature of zero degrees\nAnswer:"
