"""Error classes: each carries its DIMSE status, exit code, and whether a retry can help."""

from __future__ import annotations

import pytest

from dicom_node import errors


@pytest.mark.parametrize(
    ("cls", "retryable"),
    [
        (errors.NetworkError, True),
        (errors.SendError, True),
        (errors.StorageError, True),
        (errors.StorageFullError, True),
        (errors.InvalidDatasetError, False),
        (errors.SeriesError, False),
        (errors.SourceSeriesMissingError, False),
        (errors.RegistrationUnreliableError, False),
        (errors.PipelineError, False),
        (errors.ModelError, False),
        (errors.ConfigError, False),
    ],
)
def test_retryable(cls: type[errors.NodeError], retryable: bool) -> None:
    assert cls.retryable is retryable


def test_statuses_and_exit_codes() -> None:
    assert errors.ConflictingInstanceError.status == errors.STATUS_DATASET_MISMATCH
    assert errors.StorageFullError.status == errors.STATUS_OUT_OF_RESOURCES
    assert errors.InvalidUIDError.status == errors.STATUS_CANNOT_UNDERSTAND
    assert errors.ConfigError.exit_code == errors.EXIT_CONFIG
    assert errors.RegistrationUnreliableError.exit_code == errors.EXIT_DATA
    err = errors.RegistrationUnreliableError("bad", quality={"mask_dice": 0.5})
    assert err.quality == {"mask_dice": 0.5}
