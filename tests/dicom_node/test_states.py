"""The vocabulary: every active state is a stage a worker reports; values are stable."""

from __future__ import annotations

from dicom_node.states import (
    ACTIVE_JOB_STATES,
    STAGE_JOB_STATE,
    TERMINAL_JOB_STATES,
    DerivedKind,
    JobState,
    Stage,
)


def test_states_partition() -> None:
    assert ACTIVE_JOB_STATES.isdisjoint(TERMINAL_JOB_STATES)
    assert set(JobState) == ACTIVE_JOB_STATES | TERMINAL_JOB_STATES | {JobState.QUEUED}
    assert JobState.FUSING.is_active and not JobState.FUSING.is_terminal
    assert JobState.CANCELLED.is_terminal and not JobState.QUEUED.is_active


def test_stages_map_to_active_states() -> None:
    assert set(STAGE_JOB_STATE.values()) <= ACTIVE_JOB_STATES
    assert {Stage.REGISTER, Stage.FUSE, Stage.DERIVE} <= set(STAGE_JOB_STATE)


def test_values_are_what_the_index_and_config_hold() -> None:
    assert [str(k) for k in DerivedKind] == ["fused", "registered_mr", "reg"]
    assert JobState("done") is JobState.DONE and str(JobState.DONE) == "done"
