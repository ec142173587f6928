"""Datasets a hostile-but-fair peer would send, made from the committed CT fixture.

Each :class:`Case` is the exact dataset bytes to put on the wire (no file meta), the
presentation context to send them on, and the DIMSE status the node must answer: a failure
status for what cannot be read or does not match its context, 0x0000 for real-world variation
that is readable (accepted on purpose). Used by the unit tests of the validator (as files) and
by the fuzz suite over the network.
"""

from __future__ import annotations

import copy
import hashlib
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from dicom_node.errors import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_ENCODING_MISMATCH,
    STATUS_INSTANCE_TOO_LARGE,
    STATUS_PIXEL_DATA_MISMATCH,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
RT_DOSE = "1.2.840.10008.5.1.4.1.1.481.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
OK = 0x0000
C210, A900 = STATUS_CANNOT_UNDERSTAND, STATUS_DATASET_MISMATCH
A901, A902, A701 = STATUS_ENCODING_MISMATCH, STATUS_PIXEL_DATA_MISMATCH, STATUS_INSTANCE_TOO_LARGE
ITEM = b"\xfe\xff\x00\xe0"
SEQ_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
ENCAPSULATED_PIXELS = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"


@dataclass(frozen=True)
class Case:
    """One C-STORE a peer sends, and the status the node must answer."""

    name: str
    group: str
    dataset: bytes
    expect: int
    sop_instance: bytes
    context_class: str = CT
    transfer_syntax: str = str(ExplicitVRLittleEndian)
    request_class: str | None = None
    why: str = ""

    @property
    def accepted(self) -> bool:
        """The node must store this one (readable real-world variation)."""
        return self.expect == OK

    def part10(self) -> bytes:
        """The bytes as a Part-10 file, the file meta naming the case's transfer syntax."""
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(self.request_class or self.context_class)
        meta.MediaStorageSOPInstanceUID = UID(self.sop_instance.decode("ascii", "replace"))
        meta.TransferSyntaxUID = UID(self.transfer_syntax)
        buf = DicomBytesIO()
        buf.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(buf, meta, enforce_standard=True)
        return buf.getvalue() + self.dataset


def uid(salt: str) -> str:
    """A deterministic 2.25 UID."""
    return "2.25." + str(int.from_bytes(hashlib.sha256(salt.encode()).digest()[:16], "big"))


def encode(ds: Dataset, ts: str = str(ExplicitVRLittleEndian)) -> bytes:
    """The dataset's bytes in ``ts`` (deflated when ``ts`` says so), without file meta."""
    syntax = UID(ts)
    buf = DicomBytesIO()
    buf.is_little_endian = bool(syntax.is_little_endian)
    buf.is_implicit_VR = bool(syntax.is_implicit_VR)
    write_dataset(buf, ds)
    data = buf.getvalue()
    if syntax.is_deflated:
        deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = deflater.compress(data) + deflater.flush()
        if len(data) % 2:
            data += b"\x00"
    return data


class Fixture:
    """Fresh copies of one CT fixture dataset, each with its own UIDs."""

    def __init__(self, path: Path) -> None:
        """Read ``path`` once."""
        self.template = pydicom.dcmread(path)
        self.series = uid(f"series:{path}")

    def fresh(self, name: str) -> Dataset:
        """A copy with SOP Instance UID derived from ``name`` (Study/Series kept)."""
        ds = copy.deepcopy(self.template)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SeriesInstanceUID = self.series
        ds.SOPInstanceUID = uid(f"instance:{name}")
        return ds


def _pixel_offset(data: bytes, marker: bytes) -> int:
    at = data.rfind(marker)
    if at < 0:
        raise ValueError("no Pixel Data element in the encoded dataset")
    return at


def _native_pixel_value_start(data: bytes) -> int:
    """Offset of the native Pixel Data value in explicit VR LE bytes."""
    return _pixel_offset(data, b"\xe0\x7f\x10\x00OW\x00\x00") + 12


def _case(name: str, group: str, ds: Dataset, data: bytes, expect: int, **kw: object) -> Case:
    return Case(name, group, data, expect, str(ds.SOPInstanceUID).encode(), **kw)  # type: ignore[arg-type]


def truncation_cases(fx: Fixture) -> list[Case]:
    """The transfer ends early, or more follows the dataset's end."""
    cases = []
    for label, cut in (
        ("in the header", 0.05),
        ("at mid header", 0.25),
        ("in Pixel Data (half)", 0.6),
        ("in Pixel Data (90%)", 0.9),
    ):
        ds = fx.fresh(f"trunc-{label}")
        data = encode(ds)
        cases.append(
            _case(f"truncated {label}", "truncated", ds, data[: int(len(data) * cut)], C210)
        )
    for short in (1, 2, 100):
        ds = fx.fresh(f"short-{short}")
        data = encode(ds)
        cases.append(
            _case(f"truncated {short} bytes before the end", "truncated", ds, data[:-short], C210)
        )
    ds = fx.fresh("header-cut")
    data = encode(ds)
    cases.append(_case("stream ends inside an element header", "truncated", ds, data[:35], C210))
    ds = fx.fresh("empty")
    cases.append(_case("empty dataset", "truncated", ds, b"", C210))
    rng = random.Random(9)
    for extra in (
        b"\x00",
        b"\x00\x00",
        b"\x00" * 4,
        b"\x00" * 8,
        rng.randbytes(16),
        rng.randbytes(100),
    ):
        ds = fx.fresh(f"trailing-{len(extra)}-{extra[:1]!r}")
        cases.append(
            _case(
                f"{len(extra)} bytes after the dataset",
                "trailing bytes",
                ds,
                encode(ds) + extra,
                C210,
            )
        )
    ds = fx.fresh("twice")
    cases.append(_case("the dataset twice", "trailing bytes", ds, encode(ds) * 2, C210))
    return cases


def garbage_cases(fx: Fixture) -> list[Case]:
    """Bytes that are no dataset at all."""
    rng = random.Random(7)
    blobs = {
        "10 random bytes": rng.randbytes(10),
        "1000 random bytes": rng.randbytes(1000),
        "100000 random bytes": rng.randbytes(100_000),
        "1000 zero bytes": b"\x00" * 1000,
        "1000 0xFF bytes": b"\xff" * 1000,
        "a Part-10 file header as dataset": b"\x00" * 128 + b"DICM" + rng.randbytes(200),
        "text": b"this is not a DICOM dataset at all, just some text\n" * 20,
    }
    cases = []
    for name, blob in blobs.items():
        ds = fx.fresh(f"garbage-{name}")
        cases.append(_case(name, "garbage", ds, blob, C210))
    return cases


def _swap_value_length(data: bytes, start: int, delta: int) -> bytes:
    """Grow or shrink native Pixel Data by ``delta`` bytes, keeping its header consistent."""
    (length,) = struct.unpack("<L", data[start - 4 : start])
    body = data[start : start + length]
    body = body + b"\x00" * delta if delta > 0 else body[:delta]
    return data[: start - 4] + struct.pack("<L", length + delta) + body + data[start + length :]


def pixel_cases(fx: Fixture) -> list[Case]:
    """Pixel Data missing or disagreeing with the image attributes."""
    cases = []
    ds = fx.fresh("no-pixels")
    del ds.PixelData
    cases.append(_case("Pixel Data missing", "pixel data", ds, encode(ds), A902))
    for delta in (2, -2, -1000):
        ds = fx.fresh(f"len{delta}")
        data = _swap_value_length(encode(ds), _native_pixel_value_start(encode(ds)), delta)
        cases.append(_case(f"Pixel Data {delta:+d} bytes", "pixel data", ds, data, A902))
    for keyword, value in (
        ("Rows", 0),
        ("Columns", 0),
        ("Rows", 9000),
        ("Columns", 65535),
        ("Rows", 129),
        ("BitsAllocated", 8),
        ("BitsAllocated", 12),
        ("SamplesPerPixel", 3),
        ("SamplesPerPixel", 2),
        ("NumberOfFrames", 2),
    ):
        ds = fx.fresh(f"{keyword}-{value}")
        setattr(ds, keyword, value)
        cases.append(_case(f"{keyword} = {value}", "pixel data", ds, encode(ds), A902))
    ds = fx.fresh("frames-x")
    ds.NumberOfFrames = 1
    data = encode(ds).replace(b"\x28\x00\x08\x00IS\x02\x001 ", b"\x28\x00\x08\x00IS\x02\x00x ")
    cases.append(_case("NumberOfFrames = 'x'", "pixel data", ds, data, A902))
    for keyword in ("Rows", "BitsAllocated", "SamplesPerPixel"):
        ds = fx.fresh(f"missing-{keyword}")
        delattr(ds, keyword)
        cases.append(_case(f"{keyword} missing", "pixel data", ds, encode(ds), A902))
    return cases


def context_cases(fx: Fixture) -> list[Case]:
    """A dataset that does not match its presentation context or its request."""
    cases = []
    for cls, label in ((RT_DOSE, "RT Dose"), (SECONDARY_CAPTURE, "Secondary Capture"), (MR, "MR")):
        ds = fx.fresh(f"class-{label}")
        ds.SOPClassUID = cls
        cases.append(
            _case(f"{label} SOP class on the CT context", "SOP class", ds, encode(ds), A900)
        )
    ds = fx.fresh("request-class")
    cases.append(
        _case(
            "request names RT Dose on the CT context",
            "SOP class",
            ds,
            encode(ds),
            A900,
            request_class=RT_DOSE,
        )
    )
    ds = fx.fresh("request-uid")
    other = Case("request UID differs", "SOP class", encode(ds), C210, uid("other").encode())
    cases.append(other)
    explicit, implicit = str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)
    for name, data_ts, context_ts in (
        ("implicit VR bytes on an explicit VR context", implicit, explicit),
        ("explicit VR bytes on an implicit VR context", explicit, implicit),
        ("big endian bytes on a little endian context", str(ExplicitVRBigEndian), explicit),
        ("little endian bytes on a big endian context", explicit, str(ExplicitVRBigEndian)),
    ):
        ds = fx.fresh(name)
        cases.append(
            _case(
                name, "transfer syntax", ds, encode(ds, data_ts), A901, transfer_syntax=context_ts
            )
        )
    ds = fx.fresh("not-deflated")
    cases.append(
        _case(
            "plain bytes on a deflated context",
            "transfer syntax",
            ds,
            encode(ds),
            C210,
            transfer_syntax=str(DeflatedExplicitVRLittleEndian),
        )
    )
    ds = fx.fresh("deflated-cut")
    data = encode(ds, str(DeflatedExplicitVRLittleEndian))
    cases.append(
        _case(
            "deflated stream cut short",
            "truncated",
            ds,
            data[: len(data) // 2],
            C210,
            transfer_syntax=str(DeflatedExplicitVRLittleEndian),
        )
    )
    ds = fx.fresh("native-on-jpegls")
    cases.append(
        _case(
            "native Pixel Data on a JPEG-LS context",
            "transfer syntax",
            ds,
            encode(ds),
            A901,
            transfer_syntax=str(JPEGLSLossless),
        )
    )
    return cases


def uid_cases(fx: Fixture) -> list[Case]:
    """UIDs that must never become a path or an index row."""
    bad = {
        "newline": "1.2.3\n2024-01-01 INFO forged line",
        "65 characters": "1." + "2" * 63,
        "letters": "1.2.abc",
        "empty component": "1.2..3",
        "leading dot": ".1.2",
        "path traversal": "../../etc/x",
        "NUL inside": "1.2\x003.4",
        "space inside": "1.2 3",
    }
    cases = []
    for label, value in bad.items():
        ds = fx.fresh(f"uid-{label}")
        request = value.encode("latin-1")
        if len(value) > 64:  # pynetdicom itself drops a request naming such a UID
            request = str(ds.SOPInstanceUID).encode()
        ds.SOPInstanceUID = value
        cases.append(Case(f"SOP Instance UID with {label}", "UIDs", encode(ds), C210, request))
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        ds = fx.fresh(f"uid-{keyword}")
        setattr(ds, keyword, "1.2.3\r\nforged")
        cases.append(_case(f"{keyword} with CR LF", "UIDs", ds, encode(ds), C210))
    return cases


def structure_cases(fx: Fixture) -> list[Case]:
    """Element structure that no reader can follow."""
    cases = []
    ds = fx.fresh("bad-vr")
    data = bytearray(encode(ds))
    at = data.find(b"\x08\x00\x60\x00CS")  # Modality
    data[at + 4 : at + 6] = b"ZZ"
    cases.append(_case("element with VR 'ZZ'", "structure", ds, bytes(data), A901))
    ds = fx.fresh("deep")
    inner = Dataset()
    inner.CodeValue = "1"
    for _ in range(80):
        outer = Dataset()
        outer.ReferencedImageSequence = Sequence([inner])
        inner = outer
    ds.ReferencedImageSequence = inner.ReferencedImageSequence
    cases.append(_case("sequences nested 80 deep", "structure", ds, encode(ds), C210))
    ds = fx.fresh("meta-in-dataset")
    meta_elem = b"\x02\x00\x10\x00UI\x14\x00" + b"1.2.840.10008.1.2.1\x00"
    cases.append(
        _case("file meta element inside the dataset", "structure", ds, meta_elem + encode(ds), C210)
    )
    ds = fx.fresh("undefined-lo")
    data = bytearray(encode(ds))
    at = data.find(b"\x08\x00\x60\x00CS")
    data[at + 4 : at + 8] = b"UT\x00\x00"  # long VR header over a short one: lengths go astray
    cases.append(_case("short VR rewritten as long VR", "structure", ds, bytes(data), C210))
    ds = fx.fresh("item-overrun")
    item = Dataset()
    item.ReferencedSOPClassUID = CT
    item.ReferencedSOPInstanceUID = uid("ref")
    ds.ReferencedImageSequence = Sequence([item])
    data = bytearray(encode(ds))
    at = data.find(b"\x08\x00\x40\x11SQ\x00\x00")
    (length,) = struct.unpack("<L", data[at + 8 : at + 12])
    data[at + 8 : at + 12] = struct.pack("<L", length - 6)
    cases.append(_case("item longer than its sequence", "structure", ds, bytes(data), C210))
    return cases


def _compressed(fx: Fixture, name: str, ts: UID) -> tuple[Dataset, bytes]:
    ds = fx.fresh(name)
    ds.compress(ts)
    return ds, encode(ds)


def encapsulated_cases(fx: Fixture) -> list[Case]:
    """Compressed Pixel Data with broken fragments."""
    jls = str(JPEGLSLossless)
    cases = []

    def broken(name: str, group: str, expect: int, edit: Callable[[bytes, int], bytes]) -> None:
        ds, data = _compressed(fx, name, JPEGLSLossless)
        at = _pixel_offset(data, ENCAPSULATED_PIXELS) + len(ENCAPSULATED_PIXELS)
        cases.append(_case(name, group, ds, edit(data, at), expect, transfer_syntax=jls))

    def first_fragment(d: bytes, at: int) -> tuple[int, int]:
        """(offset of the first fragment's value, its length): after the offset table item."""
        (bot,) = struct.unpack("<L", d[at + 4 : at + 8])
        item = at + 8 + bot
        (length,) = struct.unpack("<L", d[item + 4 : item + 8])
        return item + 8, length

    def cut_codestream(d: bytes, at: int) -> bytes:
        start, length = first_fragment(d, at)
        half = (length // 2) & ~1
        return d[: start - 4] + struct.pack("<L", half) + d[start : start + half] + SEQ_END

    def no_soi(d: bytes, at: int) -> bytes:
        start, _ = first_fragment(d, at)
        return d[:start] + b"\x00\x00" + d[start + 2 :]

    def bad_item_tag(d: bytes, at: int) -> bytes:
        start, _ = first_fragment(d, at)
        return d[: start - 8] + b"\xfe\xff\x00\xe1" + d[start - 4 :]

    broken("no fragments", "fragments", C210, lambda d, at: d[:at] + ITEM + b"\x00" * 4 + SEQ_END)
    broken("no offset table item", "fragments", C210, lambda d, at: d[:at] + SEQ_END)
    broken("fragment cut short", "truncated", C210, lambda d, at: d[: at + 40])
    broken("sequence delimiter missing", "truncated", C210, lambda d, at: d[: -len(SEQ_END)])
    broken("broken fragment item tag", "fragments", C210, bad_item_tag)
    broken(
        "offset table of 3 bytes",
        "fragments",
        C210,
        lambda d, at: d[:at] + ITEM + b"\x03\x00\x00\x00abc" + d[at + 8 :],
    )
    broken("JPEG-LS codestream cut (no EOI)", "fragments", C210, cut_codestream)
    broken("JPEG-LS frame without SOI", "fragments", C210, no_soi)
    ds, data = _compressed(fx, "j2k-size", JPEG2000Lossless)
    ds2 = fx.fresh("j2k-size-rows")
    ds2.Rows = 64
    ds2.PixelData = ds.PixelData
    ds2["PixelData"].is_undefined_length = True
    ds2["PixelData"].VR = "OB"
    cases.append(
        _case(
            "JPEG 2000 frame larger than Rows",
            "pixel data",
            ds2,
            encode(ds2),
            A902,
            transfer_syntax=str(JPEG2000Lossless),
        )
    )
    ds, data = _compressed(fx, "rle-header", RLELossless)
    at = _pixel_offset(data, ENCAPSULATED_PIXELS) + len(ENCAPSULATED_PIXELS)
    start, _ = first_fragment(data, at)
    bad = data[:start] + struct.pack("<L", 9) + data[start + 4 :]
    cases.append(
        _case(
            "RLE header with 9 segments",
            "fragments",
            ds,
            bad,
            C210,
            transfer_syntax=str(RLELossless),
        )
    )
    return cases


def accepted_cases(fx: Fixture) -> list[Case]:
    """Readable real-world variation the node must accept."""
    cases = []
    for ts in (
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    ):
        ds = fx.fresh(f"good-{ts}")
        if ts == ExplicitVRBigEndian:
            ds.PixelData = ds.pixel_array.astype(
                ">u2" if ds.PixelRepresentation == 0 else ">i2"
            ).tobytes()
        cases.append(
            _case(
                f"good, {ts.name}", "accepted", ds, encode(ds, str(ts)), OK, transfer_syntax=str(ts)
            )
        )
    for ts in (JPEGLSLossless, RLELossless, JPEG2000Lossless):
        ds, data = _compressed(fx, f"good-{ts}", ts)
        cases.append(_case(f"good, {ts.name}", "accepted", ds, data, OK, transfer_syntax=str(ts)))
    ds = fx.fresh("odd-8bit")
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 5, 3, 8, 8, 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.arange(15, dtype=np.uint8).tobytes() + b"\x00"  # padded to even
    cases.append(
        _case(
            "odd-length 8-bit pixels with pad byte",
            "accepted",
            ds,
            encode(ds),
            OK,
            why="PS3.5 8.1.1: odd-length Pixel Data is padded to even length",
        )
    )
    ds2 = fx.fresh("odd-private")
    ds2.add_new(0x00091010, "LO", "ABC")  # private odd-length value: pydicom pads it, we unpad
    raw = bytearray(encode(ds2))
    at = raw.find(b"\x09\x00\x10\x10LO\x04\x00ABC ")
    raw[at + 6 : at + 12] = b"\x03\x00ABC"
    cases.append(
        _case(
            "odd-length private LO value",
            "accepted",
            ds2,
            bytes(raw),
            OK,
            why="readable by pydicom and DCMTK (with a warning)",
        )
    )
    ds = fx.fresh("trailing-padding")
    ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 32)
    cases.append(
        _case(
            "Data Set Trailing Padding element",
            "accepted",
            ds,
            encode(ds),
            OK,
            why="PS3.10 7.2: (FFFC,FFFC) is part of the dataset",
        )
    )
    ds = fx.fresh("un-sequence")
    seq_item = Dataset()
    seq_item.add_new(0x00111001, "LO", "X1")
    ds.add_new(0x00110010, "LO", "VENDOR")
    ds.add_new(0x00111010, "SQ", Sequence([seq_item]))
    raw = bytearray(encode(ds))
    at = raw.find(b"\x11\x00\x10\x10SQ\x00\x00")
    raw[at + 4 : at + 6] = b"UN"
    cases.append(
        _case(
            "private sequence as UN",
            "accepted",
            ds,
            bytes(raw),
            OK,
            why="PS3.5 6.2.2: UN of undefined length holds implicit VR items",
        )
    )
    return cases


def oversized_cases(fx: Fixture, limit_mb: int) -> list[Case]:
    """An instance above ``storage.max_instance_mb`` (but below the abort threshold)."""
    ds = fx.fresh("oversized")
    frames = (limit_mb * 1024 * 1024) // (ds.Rows * ds.Columns * 2) + 8
    ds.NumberOfFrames = frames
    ds.PixelData = bytes(ds.Rows * ds.Columns * 2 * frames)
    return [_case(f"{frames}-frame instance over max_instance_mb", "size", ds, encode(ds), A701)]


def all_cases(path: Path, *, limit_mb: int | None = None) -> list[Case]:
    """Every case made from the fixture at ``path`` (the oversized one if ``limit_mb``)."""
    fx = Fixture(path)
    cases = (
        truncation_cases(fx)
        + garbage_cases(fx)
        + pixel_cases(fx)
        + context_cases(fx)
        + uid_cases(fx)
        + structure_cases(fx)
        + encapsulated_cases(fx)
        + accepted_cases(fx)
    )
    if limit_mb is not None:
        cases += oversized_cases(fx, limit_mb)
    return cases


def write_part10(case: Case, folder: Path) -> Path:
    """The case as a Part-10 file in ``folder``."""
    path = folder / f"{hashlib.sha1(case.name.encode()).hexdigest()[:12]}.dcm"
    path.write_bytes(case.part10())
    return path
