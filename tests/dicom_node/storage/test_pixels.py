"""Pixel Data checks on multi-frame and fragmented encapsulated data (files, no network)."""

from __future__ import annotations

import copy
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.uid import JPEGLSLossless

from dicom_node.errors import InvalidDatasetError, PixelDataError
from dicom_node.storage.pixels import Geometry, PixelLimits, _j2k_size, _jpeg_size
from dicom_node.storage.validate import check_file
from tests.support.data import SMALL_CT
from tests.support.malformed import Case, encode, uid, write_part10

LIMITS = PixelLimits(8192)


@pytest.fixture(scope="module")
def frame() -> tuple[pydicom.Dataset, bytes]:
    """A CT fixture and one JPEG-LS codestream of its pixels."""
    path = SMALL_CT / "CT_0001.dcm"
    if not path.exists():
        pytest.skip("small fixtures missing")
    ds = pydicom.dcmread(path)
    ds.compress(JPEGLSLossless)
    (codestream,) = list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    return ds, codestream


def multiframe(ds: pydicom.Dataset, folder: Path, *, pixel_data: bytes, frames: int) -> Path:
    """``ds`` as a JPEG-LS Part-10 file of ``frames`` frames in ``pixel_data``."""
    ds = copy.deepcopy(ds)
    ds.NumberOfFrames = frames
    ds.PixelData = pixel_data
    ds["PixelData"].is_undefined_length = True
    ds.SOPInstanceUID = uid(f"mf-{frames}-{len(pixel_data)}")
    case = Case(
        "mf", "x", encode(ds), 0, str(ds.SOPInstanceUID).encode(), transfer_syntax=JPEGLSLossless
    )
    return write_part10(case, folder)


def test_multiframe_with_and_without_offset_table(
    frame: tuple[pydicom.Dataset, bytes], tmp_path: Path
) -> None:
    ds, codestream = frame
    frames = [codestream] * 3
    for data in (
        encapsulate(frames, has_bot=True),
        encapsulate(frames, has_bot=False),
        encapsulate(frames, fragments_per_frame=2, has_bot=True),  # frames found through the BOT
    ):
        path = multiframe(ds, tmp_path, pixel_data=data, frames=3)
        assert check_file(path, limits=LIMITS).frames == 3


def test_multiframe_mismatches_refused(
    frame: tuple[pydicom.Dataset, bytes], tmp_path: Path
) -> None:
    ds, codestream = frame
    fewer = encapsulate([codestream] * 2, has_bot=False)
    with pytest.raises(InvalidDatasetError, match="2 fragments for 3 frames"):
        check_file(multiframe(ds, tmp_path, pixel_data=fewer, frames=3), limits=LIMITS)
    split = encapsulate([codestream] * 3, fragments_per_frame=2, has_bot=False)
    # without an offset table JPEG frames are found by their SOI markers: 3 here, not 4
    assert check_file(multiframe(ds, tmp_path, pixel_data=split, frames=3), limits=LIMITS)
    with pytest.raises(InvalidDatasetError, match="6 fragments for 4 frames and no offset"):
        check_file(multiframe(ds, tmp_path, pixel_data=split, frames=4), limits=LIMITS)
    three = encapsulate([codestream] * 3, has_bot=True)
    with pytest.raises(InvalidDatasetError, match="3 entries for 2 frames"):
        check_file(multiframe(ds, tmp_path, pixel_data=three, frames=2), limits=LIMITS)


def test_extended_offset_table_accepted(
    frame: tuple[pydicom.Dataset, bytes], tmp_path: Path
) -> None:
    ds, codestream = frame
    data, offsets, lengths = encapsulate_extended([codestream] * 2)
    ds = copy.deepcopy(ds)
    ds.ExtendedOffsetTable = offsets
    ds.ExtendedOffsetTableLengths = lengths
    path = multiframe(ds, tmp_path, pixel_data=data, frames=2)
    assert check_file(path, limits=LIMITS).frames == 2


def test_codestream_sizes(frame: tuple[pydicom.Dataset, bytes]) -> None:
    ds, codestream = frame
    assert _jpeg_size(codestream[:4096]) == (ds.Rows, ds.Columns)
    assert _jpeg_size(b"\xff\xd8\x00\x00") is None
    siz = b"\xff\x4f\xff\x51\x00\x29\x00\x00" + (300).to_bytes(4, "big") + (200).to_bytes(4, "big")
    assert _j2k_size(siz + b"\x00" * 8) == (200, 300)


def test_geometry_lengths() -> None:
    assert Geometry(3, 5, 1, 8, 1).native_length == 15
    assert Geometry(3, 5, 1, 1, 1).native_length == 2  # 15 bits
    assert Geometry(2, 2, 3, 16, 4).native_length == 96
    assert issubclass(PixelDataError, InvalidDatasetError)
