"""Fast unit tests of the checkpoint retention policy, the run-state schema and fault injection."""
from __future__ import annotations

import json

import pytest

from hgrn_megatron.pretrain.checkpoint import RetentionPolicy, apply_retention, step_dir_name
from hgrn_megatron.pretrain.config import CheckpointConfig
from hgrn_megatron.pretrain.fault_injection import ENV_VAR, FaultInjection
from hgrn_megatron.pretrain.train_state import RunLayout, TrainState, run_state_dict, saved_layout


@pytest.mark.parametrize(
    "keep_last,keep_every,steps,deleted",
    [
        (2, None, [10, 20, 30, 40], [10, 20]),
        (1, None, [40, 10, 30], [10, 30]),  # any order in, ascending out
        (5, None, [1, 2], []),
        (1, 20, [10, 20, 30, 40, 50], [10, 30]),  # milestones 20 and 40 kept, and the newest
        (2, 25, [10, 20, 30, 40, 50], [10, 20, 30]),  # 50 is both newest and a milestone
        (1, 7, [], []),
    ],
)
def test_retention_policy_keeps_the_newest_and_the_milestones(keep_last, keep_every, steps, deleted):
    assert RetentionPolicy(keep_last, keep_every).steps_to_delete(steps) == deleted


def test_retention_policy_is_built_from_the_checkpoint_config_and_checks_itself():
    assert RetentionPolicy.from_config(CheckpointConfig(keep_last=3, keep_every=1000)) == RetentionPolicy(3, 1000)
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        RetentionPolicy(0)
    with pytest.raises(ValueError, match="keep_every"):
        RetentionPolicy(1, 0)


def test_apply_retention_deletes_folders_and_unfinished_saves(tmp_path):
    for step in (100, 200, 300, 400):
        (tmp_path / step_dir_name(step)).mkdir()
    (tmp_path / (step_dir_name(500) + ".tmp")).mkdir()  # a save that never finished
    (tmp_path / "latest").write_text(step_dir_name(400) + "\n")
    apply_retention(tmp_path, RetentionPolicy(keep_last=1, keep_every=200))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", step_dir_name(200), step_dir_name(400)]


LAYOUT = RunLayout(world_size=4, dp_size=2, tp_size=2, zero_stage=1, tokenizer_sha256="ab" * 32, vocab_size=4000,
                   padded_vocab_size=4096)


def test_run_state_round_trips_and_reads_older_formats():
    state = TrainState(step=7, consumed_samples=56, consumed_tokens=1792, skipped_steps=1, last_val_loss=3.5,
                       validation_due=True, interval_loss_sum=9.0, interval_applied=3, interval_skipped=1)
    saved = json.loads(json.dumps(run_state_dict(state, LAYOUT)))
    assert saved["format"] == 3 and TrainState.from_run_state(saved) == state and saved_layout(saved) == LAYOUT
    # Format 2 had neither the interval sums nor the interrupted validation: they take their defaults.
    old = {"format": 2, "step": 7, "consumed_samples": 56, "consumed_tokens": 1792, "skipped_steps": 1,
           "nonfinite_in_a_row": 0, "last_val_loss": None, **{k: v for k, v in saved.items() if k in LAYOUT.__dict__}}
    restored = TrainState.from_run_state(old)
    assert restored.step == 7 and restored.interval_applied == 0 and restored.validation_due is False


def test_train_state_interval_means_cover_applied_steps_only():
    state = TrainState()
    state.record_step(4.0, True, samples=8, tokens=256)
    state.record_step(float("nan"), False, samples=8, tokens=256)
    state.record_step(2.0, True, samples=8, tokens=256)
    assert (state.step, state.consumed_samples, state.consumed_tokens, state.skipped_steps) == (3, 24, 768, 1)
    assert state.take_interval() == (3.0, 1)
    mean, skipped = state.take_interval()
    assert mean != mean and skipped == 0  # NaN: no applied step in the new interval


def test_fault_injection_reads_the_environment_and_refuses_typos(monkeypatch):
    assert FaultInjection.from_env() == FaultInjection()
    monkeypatch.setenv(ENV_VAR, '{"nonfinite_at_steps": [3, 4], "kill_at_step": 5, "kill_rank": 1}')
    faults = FaultInjection.from_env()
    assert faults.poisons(3) and not faults.poisons(5) and faults.kill_at_step == 5 and faults.kill_rank == 1
    faults.maybe_kill(5, rank=0)  # another rank's fault: nothing happens
    monkeypatch.setenv(ENV_VAR, '{"nonfinite_at_step": [3]}')
    with pytest.raises(ValueError, match="unknown keys"):
        FaultInjection.from_env()


def test_test_hooks_are_not_part_of_the_run_config():
    from hgrn_megatron.pretrain.config import TrainConfig

    assert not [name for name in TrainConfig.model_fields if "inject" in name]
