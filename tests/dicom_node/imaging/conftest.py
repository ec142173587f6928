"""Fixtures of the imaging tests: the small fixture pair read as volumes, derived outputs."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.config import DEFAULT_MAX_GAP_MM
from dicom_node.imaging.volumes import SeriesVolume, read_series_dir
from tests.support import derived
from tests.support.data import SMALL_CT, SMALL_MR, require_small_fixtures
from tests.support.derived import IdentityOutputs


@pytest.fixture(scope="session")
def ct_volume() -> SeriesVolume:
    """The small fixture CT (irregular slice positions: read with the default gap policy)."""
    require_small_fixtures()
    return read_series_dir(SMALL_CT, max_gap_mm=DEFAULT_MAX_GAP_MM)


@pytest.fixture(scope="session")
def mr_volume() -> SeriesVolume:
    """The small fixture MR (regular: read with no gap allowed)."""
    require_small_fixtures()
    return read_series_dir(SMALL_MR, max_gap_mm=0.0)


@pytest.fixture(scope="session")
def identity_outputs(ct_volume: SeriesVolume, mr_volume: SeriesVolume) -> IdentityOutputs:
    """All three derived kinds of the fixture pair without registration or the network."""
    return derived.identity_outputs(ct_volume, mr_volume)


@pytest.fixture
def series_copy(tmp_path: Path) -> Callable[[Path], tuple[Path, list[Dataset]]]:
    """Copy a fixture series folder into tmp; returns (folder, datasets sorted by file name)."""

    def make(src: Path) -> tuple[Path, list[Dataset]]:
        require_small_fixtures()
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        return dst, [pydicom.dcmread(f) for f in sorted(dst.glob("*.dcm"))]

    return make
