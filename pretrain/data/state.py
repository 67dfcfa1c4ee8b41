"""The pipeline state: small, made of plain types (JSON- and `torch.load(weights_only=True)`-safe).

A rank's state (`TrainLoader.state_dict()`) holds the lanes that rank read, each as of the last sample the
trainer consumed (not as of what workers prefetched). `merge_data_states` combines the ranks' states taken at
the same step into one global state: per lane, the copy that produced the most samples. A loader built from the
global state at any data-parallel size or worker count continues the same global sample sequence.

    rank:   {"format", "kind": "rank", "fingerprint", "dp_rank", "dp_size", "start_sample",
             "consumed_samples", "lanes": [lane, ...]}
    global: {"format", "kind": "global", "fingerprint", "next_sample", "saved_dp_size", "lanes": [all L lanes]}
    lane:   {"lane", "samples", "doc": [ordinal, pass, slot, line] | None, "offset", "doc_pass", "counters"}
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from hgrn_megatron.corpus.records import DEFAULT_FORMAT
from hgrn_megatron.corpus.shards import DataError

from .packing import PackingSpec, fresh_lane_state

STATE_FORMAT = "hgrn-data-state/2"
# Format 1 dealt records to lanes one by one (record k to lane k mod L); format 2 deals units (frames, or whole
# shards without an index): the same positions mean other data, so a format-1 state cannot continue.
OLD_STATE_FORMATS = {"hgrn-data-state/1": "dealt records to lanes one by one; lanes now own whole units (frames)"}


# Fingerprint keys that states saved by earlier versions lack, each with the value such a state stands for (what
# those versions did). A key added to the fingerprint needs an entry here, or every earlier run's state would be
# refused; the value is this version's default, so a run that keeps the default resumes.
FINGERPRINT_DEFAULTS: dict[str, object] = {
    "max_document_bytes": DEFAULT_FORMAT.max_document_bytes,
    "frame_layout": None,  # frames per shard when some shard has a frame index
    # Fewer units than lanes: lanes deal each unit's records among themselves. Earlier versions gave such lanes
    # whole units of later passes (the same shard heads read by many lanes at once), so their states mean
    # other samples and cannot continue.
    "lanes_share_units": False,
}
_MISSING = object()


def fingerprint(spec: PackingSpec, tokenizer_sha256: str) -> dict:
    """What must not change for a saved state to mean the same sample sequence."""
    return {
        "seq_length": spec.seq_length,
        "lanes": spec.lanes,
        "seed": spec.seed,
        "shards": list(spec.names),
        "shard_weights": list(spec.shard_weights),
        "source_weights": dict(sorted(spec.source_weights.items())),
        **dataclasses.asdict(spec.record_format),  # text_field, source_field, max_document_bytes
        "tokenizer_sha256": tokenizer_sha256,
        **({"frame_layout": layout} if (layout := spec.units.layout()) is not None else {}),
        **({"lanes_share_units": True} if len(spec.units) < spec.lanes else {}),
    }


def check_fingerprint(saved: dict, current: dict) -> None:
    """DataError listing every difference; a key one side lacks compares as its `FINGERPRINT_DEFAULTS` value."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        default = FINGERPRINT_DEFAULTS.get(key, _MISSING)
        a, b = saved.get(key, default), current.get(key, default)
        if a != b:
            a, b = (None if v is _MISSING else v for v in (a, b))
            if key == "shards":
                gone, new = sorted(set(a or []) - set(b or [])), sorted(set(b or []) - set(a or []))
                diffs.append(f"shards: {len(a or [])} saved vs {len(b or [])} now (missing {gone[:3]}, new {new[:3]})")
            else:
                diffs.append(f"{key}: saved {a!r}, now {b!r}")
    if diffs:
        raise DataError(
            "the saved data state belongs to a different data setup, so the sample sequence cannot continue:\n  "
            + "\n  ".join(diffs)
        )


def rank_lanes(lanes: int, start_sample: int, dp_rank: int, dp_size: int) -> list[int]:
    """The lanes whose samples rank `dp_rank` takes: global samples start_sample + dp_rank + t * dp_size."""
    step = math.gcd(lanes, dp_size)
    first = (start_sample + dp_rank) % step
    return list(range(first, lanes, step))


def expected_lane_samples(next_sample: int, lane: int, lanes: int) -> int:
    """How many samples lane `lane` has produced once global samples [0, next_sample) are consumed."""
    return max(0, -(-(next_sample - lane) // lanes))


def initial_global_state(fp: dict) -> dict:
    return {
        "format": STATE_FORMAT,
        "kind": "global",
        "fingerprint": fp,
        "next_sample": 0,
        "saved_dp_size": None,
        "lanes": [fresh_lane_state(lane) for lane in range(fp["lanes"])],
    }


def merge_data_states(states: Sequence[dict]) -> dict:
    """Merge every data-parallel rank's `state_dict()` (taken at the same step) into one global state."""
    if not states:
        raise DataError("merge_data_states: no states given")
    for i, s in enumerate(states):
        if not isinstance(s, dict) or s.get("format") != STATE_FORMAT:
            raise DataError(f"merge_data_states: state {i} is not a data state of format {STATE_FORMAT}")
    if len(states) == 1 and states[0]["kind"] == "global":
        return states[0]
    kinds = {s["kind"] for s in states}
    if kinds != {"rank"}:
        raise DataError(f"merge_data_states: expected one state per rank, got kinds {sorted(kinds)}")
    fp = states[0]["fingerprint"]
    for s in states[1:]:
        check_fingerprint(fp, s["fingerprint"])
    dp_size = states[0]["dp_size"]
    ranks = sorted(s["dp_rank"] for s in states)
    if ranks != list(range(dp_size)) or any(s["dp_size"] != dp_size for s in states):
        raise DataError(f"merge_data_states: need the states of ranks 0..{dp_size - 1}, got ranks {ranks}")
    starts = {s["start_sample"] for s in states}
    consumed = {s["consumed_samples"] for s in states}
    if len(starts) != 1 or len(consumed) != 1:
        raise DataError(
            f"merge_data_states: ranks are at different points (start samples {sorted(starts)}, consumed "
            f"{sorted(consumed)}); take states at a step boundary, where every rank consumed the same count"
        )
    next_sample = starts.pop() + consumed.pop() * dp_size
    lanes: dict[int, dict] = {}
    for s in states:
        for lane in s["lanes"]:
            best = lanes.get(lane["lane"])
            if best is None or lane["samples"] > best["samples"]:
                lanes[lane["lane"]] = lane
    L = fp["lanes"]
    if sorted(lanes) != list(range(L)):
        raise DataError(f"merge_data_states: the ranks' states cover lanes {sorted(lanes)[:8]}..., not all {L}")
    for lane, st in lanes.items():
        want = expected_lane_samples(next_sample, lane, L)
        if st["samples"] != want:
            raise DataError(
                f"merge_data_states: lane {lane} produced {st['samples']} samples, expected {want} at global "
                f"sample {next_sample}; the rank states are inconsistent"
            )
    return {
        "format": STATE_FORMAT,
        "kind": "global",
        "fingerprint": fp,
        "next_sample": next_sample,
        "saved_dp_size": dp_size,
        "lanes": [lanes[i] for i in range(L)],
    }


def as_global_state(state: dict) -> dict:
    """Accept a global state, or the state of a single-rank run (merged on the spot)."""
    if isinstance(state, dict) and state.get("format") in OLD_STATE_FORMATS:
        raise DataError(f"the data state has format {state['format']}, which {OLD_STATE_FORMATS[state['format']]}; "
                        f"the sample order differs, so it cannot continue (start the data from a fresh state)")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        got = f"keys {sorted(state)[:6]}" if isinstance(state, dict) else type(state).__name__
        raise DataError(f"not a data state of format {STATE_FORMAT} (got {got})")
    if state["kind"] == "global":
        return state
    if state["dp_size"] == 1:
        return merge_data_states([state])
    raise DataError(
        f"this is rank {state['dp_rank']}'s data state of {state['dp_size']}; merge all ranks' states with "
        f"merge_data_states() and resume from the result"
    )
