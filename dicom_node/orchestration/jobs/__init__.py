"""Every job and send transition of the node, and nothing else (states in ``states.py``).

- :mod:`.lifecycle`: creation, atomic claim, stages, hand-back, outcome of an attempt;
- :mod:`.sends`: the per-destination send rows and their retries;
- :mod:`.recovery`: taking work back from dead workers;
- :mod:`.admin`: retry and cancel on an admin's request;
- :mod:`.settings`: the retry, lease and polling settings derived from the config.
"""

from __future__ import annotations

from dicom_node.orchestration.jobs.admin import cancel_job, retry_job
from dicom_node.orchestration.jobs.lifecycle import (
    claim_next,
    create_job,
    enter_stage,
    fail_attempt,
    finish_if_sent,
    hand_back,
    heartbeat,
    release_to_sends,
    set_output_dir,
)
from dicom_node.orchestration.jobs.recovery import (
    check_clock,
    host_identity,
    owner_id,
    recover_stale,
)
from dicom_node.orchestration.jobs.settings import Settings, backoff_seconds

__all__ = [
    "Settings",
    "backoff_seconds",
    "cancel_job",
    "check_clock",
    "claim_next",
    "create_job",
    "enter_stage",
    "fail_attempt",
    "finish_if_sent",
    "hand_back",
    "heartbeat",
    "host_identity",
    "owner_id",
    "recover_stale",
    "release_to_sends",
    "retry_job",
    "set_output_dir",
]
