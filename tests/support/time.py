"""Clock helpers: scans run "later" than now instead of waiting for quiet periods."""

from __future__ import annotations

from datetime import datetime, timedelta

from dicom_node import models

LATER = timedelta(seconds=5)
"""Longer than the test config's quiet period (1 s)."""


def later() -> datetime:
    """A moment after every quiet period of the test config has passed."""
    return models.utcnow() + LATER
