"""Fixtures of the registration tests: the small committed MRI-DIR pair and a synthesis source
made from its CT (MR-like cases are built from it by ``cases.py``)."""

from __future__ import annotations

import pytest
import SimpleITK as sitk

from tests.fusion_engine.registration import cases
from tests.peers import FIXTURES

SMALL = FIXTURES / "mridir_small"


@pytest.fixture(scope="session")
def small_pair() -> tuple[sitk.Image, sitk.Image]:
    """The committed 128 x 128 MRI-DIR CT (HU) and MR, read as the node reads them."""
    if not any((SMALL / "ct").glob("*.dcm")) or not any((SMALL / "mr").glob("*.dcm")):
        pytest.skip(f"fixtures missing in {SMALL} (run tests/fixtures/make_fixtures.py)")
    return cases.read_volume(SMALL / "ct"), cases.read_volume(SMALL / "mr")


@pytest.fixture(scope="session")
def source(small_pair: tuple[sitk.Image, sitk.Image]) -> cases.Source:
    """Tissue signals of the small CT, for MR-like cases with a known truth."""
    return cases.Source.of(small_pair[0])
