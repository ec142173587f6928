"""Pixel Data checks of :mod:`dicom_node.storage.validate`: present, as large as the image
attributes say, and (compressed) in fragments a decoder can use.

Native syntaxes: the value length must equal Rows x Columns x Samples per Pixel x Bits
Allocated / 8 x Number of Frames, or that plus one pad byte when it is odd (PS3.5 8.1.1).

Encapsulated syntaxes: a Basic Offset Table item (empty, or one offset per frame, each at the
start of a fragment), at least one fragment per frame, a sequence delimiter. Each frame must
start with its codec's start marker (JPEG/JPEG-LS SOI, JPEG 2000 SOC or a JP2 signature) and a
JPEG or JPEG-LS frame must end with EOI (trailing zero padding allowed); the first frame's size
in its codestream header must be Rows x Columns; an RLE frame must have a valid RLE header with
one segment per byte of each sample. Frames are not decoded (that costs CPU on every instance
and is the reader's job); a codestream damaged *inside* an otherwise intact structure is the
sender's encoder fault and passes.

Rows and Columns must be between 1 and ``storage.max_rows_columns``.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydicom.uid import (
    UID,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLELossless,
)

from dicom_node.errors import InvalidDatasetError, PixelDataError

if TYPE_CHECKING:
    from dicom_node.storage.validate import Walker

SAMPLES_PER_PIXEL = 0x00280002
NUMBER_OF_FRAMES = 0x00280008
ROWS = 0x00280010
COLUMNS = 0x00280011
BITS_ALLOCATED = 0x00280100
EXTENDED_OFFSET_TABLE = 0x7FE00001
PIXEL_DATA = 0x7FE00010
ITEM = 0xFFFEE000
SEQUENCE_DELIMITER = 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF

PIXEL_VALUE_TAGS = frozenset(
    {SAMPLES_PER_PIXEL, NUMBER_OF_FRAMES, ROWS, COLUMNS, BITS_ALLOCATED, EXTENDED_OFFSET_TABLE}
)
"""Top-level elements whose values the checks need (all precede Pixel Data)."""

MAX_VALUE_LENGTH = 1 << 16
MAX_FRAGMENTS = 100_000
FIRST_HEAD = 4096
"""Bytes kept of the first fragment: enough for the JPEG/J2K headers that give its size."""
HEAD = 64
TAIL = 16
JPEG_START = b"\xff\xd8"
JPEG_END = b"\xff\xd9"
J2K_START = b"\xff\x4f\xff\x51"
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_SOF_MARKERS = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), 0xCD})
_SOF_MARKERS = _SOF_MARKERS | {0xCE, 0xCF, 0xF7}  # 0xF7: JPEG-LS SOF55
JPEG_FAMILY = frozenset(str(ts) for ts in (*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes))
"""Syntaxes whose frames are JPEG or JPEG-LS codestreams (SOI ... EOI)."""
J2K_FAMILY = frozenset(str(ts) for ts in JPEG2000TransferSyntaxes)


@dataclass(frozen=True)
class PixelLimits:
    """Bounds from ``storage``: the largest Rows or Columns accepted."""

    max_rows_columns: int


@dataclass(frozen=True)
class Geometry:
    """The image attributes Pixel Data must agree with."""

    rows: int
    columns: int
    samples: int
    bits: int
    frames: int

    @property
    def native_length(self) -> int:
        """Bytes of native Pixel Data (before the pad byte of an odd length)."""
        bits = self.rows * self.columns * self.samples * self.bits * self.frames
        return (bits + 7) // 8


@dataclass
class Fragments:
    """What is kept of the fragments of encapsulated Pixel Data (a bounded summary)."""

    offsets: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    heads: list[bytes] = field(default_factory=list)
    tails: list[bytes] = field(default_factory=list)


class PixelChecker:
    """Collects the top-level image attributes and checks Pixel Data against them."""

    def __init__(self, limits: PixelLimits, ts: UID) -> None:
        self.limits = limits
        self.ts = ts
        self.values: dict[int, bytes] = {}
        self.little = bool(ts.is_little_endian)
        self.seen_pixels = False
        self.last_tag = -1
        self.frames = 1

    def order(self, tag: int, name: Callable[[int], str]) -> None:
        """Refuse top-level elements that cannot be part of the dataset where they are."""
        if self.seen_pixels and tag <= self.last_tag:
            raise InvalidDatasetError(
                f"data follows the end of the dataset ({name(tag)} after {name(self.last_tag)})"
            )
        if tag >> 16 in (0x0000, 0x0002):
            raise InvalidDatasetError(f"{name(tag)} (command or file meta group) in the dataset")
        self.last_tag = max(self.last_tag, tag)
        if tag == PIXEL_DATA:
            self.seen_pixels = True

    def value(self, tag: int, raw: bytes, *, little: bool) -> None:
        """Keep the value of one of :data:`PIXEL_VALUE_TAGS`."""
        if tag == EXTENDED_OFFSET_TABLE:
            raw = b"present"
        elif len(raw) > MAX_VALUE_LENGTH:
            raise PixelDataError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) is too long")
        self.values[tag] = raw
        self.little = little

    def _us(self, tag: int, name: str, default: int | None = None) -> int:
        raw = self.values.get(tag)
        if raw is None:
            if default is None:
                raise PixelDataError(f"the dataset has no {name}")
            return default
        if len(raw) != 2:
            raise PixelDataError(f"{name} has {len(raw)} bytes, not 2")
        return int(struct.unpack("<H" if self.little else ">H", raw)[0])

    def _frames(self) -> int:
        raw = self.values.get(NUMBER_OF_FRAMES)
        if raw is None or not raw.strip(b" \x00"):
            return 1
        try:
            frames = int(raw.strip(b" \x00").decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise PixelDataError(f"Number of Frames {raw[:16]!r} is not a number") from None
        if frames < 1:
            raise PixelDataError(f"Number of Frames is {frames}")
        return frames

    def geometry(self) -> Geometry:
        """The image attributes, each checked for a usable value."""
        bound = self.limits.max_rows_columns
        rows = self._us(ROWS, "Rows")
        columns = self._us(COLUMNS, "Columns")
        for name, value in (("Rows", rows), ("Columns", columns)):
            if value == 0:
                raise PixelDataError(f"{name} is 0")
            if value > bound:
                raise PixelDataError(f"{name} is {value}, above storage.max_rows_columns {bound}")
        samples = self._us(SAMPLES_PER_PIXEL, "Samples per Pixel")
        if samples not in (1, 3):
            raise PixelDataError(f"Samples per Pixel is {samples}, not 1 or 3")
        bits = self._us(BITS_ALLOCATED, "Bits Allocated")
        if bits != 1 and (bits % 8 or not 8 <= bits <= 64):
            raise PixelDataError(f"Bits Allocated is {bits}")
        self.frames = self._frames()
        return Geometry(rows, columns, samples, bits, self.frames)

    def native(self, length: int) -> None:
        """Check the length of native Pixel Data."""
        expected = self.geometry().native_length
        if length != expected and not (expected % 2 and length == expected + 1):
            raise PixelDataError(
                f"Pixel Data has {length} bytes; Rows x Columns x Samples per Pixel x "
                f"Bits Allocated/8 x Number of Frames = {expected}"
            )

    def finish(self) -> int:
        """After the walk: Pixel Data must have been there. Returns the number of frames."""
        if not self.seen_pixels:
            raise PixelDataError("the dataset has no Pixel Data")
        return self.frames


def skip_fragments(walker: Walker, name: str) -> None:
    """Walk the items of encapsulated Pixel Data nested in a sequence (an icon image)."""
    while True:
        tag, _, length = walker.header()
        if tag == SEQUENCE_DELIMITER:
            return
        if tag != ITEM or length == UNDEFINED:
            raise InvalidDatasetError(f"{name} in a nested item has a broken fragment")
        walker.r.skip(length)


def check_fragments(walker: Walker, pixels: PixelChecker) -> None:
    """Walk and check top-level encapsulated Pixel Data (see module docstring)."""
    geometry = pixels.geometry()
    bot = _offset_table(walker)
    fragments = _read_fragments(walker)
    starts = _frame_starts(pixels, geometry, bot, fragments)
    _check_codec(pixels.ts, geometry, fragments, starts)


def _offset_table(walker: Walker) -> list[int]:
    tag, _, length = walker.header()
    if tag != ITEM:
        raise InvalidDatasetError("encapsulated Pixel Data has no Basic Offset Table item")
    if length == UNDEFINED or length % 4 or length > 4 * MAX_FRAGMENTS:
        raise InvalidDatasetError(f"the Basic Offset Table has an invalid length {length}")
    raw = walker.r.read(length)
    return list(struct.unpack(f"<{length // 4}L", raw))


def _read_fragments(walker: Walker) -> Fragments:
    r = walker.r
    found = Fragments()
    first = r.pos
    while True:
        at = r.pos - first
        tag, _, length = walker.header()
        if tag == SEQUENCE_DELIMITER:
            break
        if tag != ITEM or length == UNDEFINED:
            raise InvalidDatasetError(
                f"encapsulated Pixel Data: fragment {len(found.offsets) + 1} is broken "
                f"({tag >> 16:04X},{tag & 0xFFFF:04X} instead of an item)"
            )
        if len(found.offsets) >= MAX_FRAGMENTS:
            raise InvalidDatasetError(f"encapsulated Pixel Data has over {MAX_FRAGMENTS} fragments")
        keep = FIRST_HEAD if not found.offsets else HEAD
        head, tail = r.skip(length, keep_head=keep, keep_tail=TAIL)
        found.offsets.append(at)
        found.lengths.append(length)
        found.heads.append(head)
        found.tails.append(tail)
    if not found.offsets:
        raise InvalidDatasetError("encapsulated Pixel Data has no fragments")
    return found


def _frame_starts(
    pixels: PixelChecker, geometry: Geometry, bot: list[int], fragments: Fragments
) -> list[int] | None:
    """Index of the first fragment of each frame (None: the mapping is not known)."""
    frames = geometry.frames
    count = len(fragments.offsets)
    if count < frames:
        raise InvalidDatasetError(
            f"encapsulated Pixel Data has {count} fragments for {frames} frames"
        )
    if bot:
        if len(bot) != frames:
            raise InvalidDatasetError(
                f"the Basic Offset Table has {len(bot)} entries for {frames} frames"
            )
        index = {offset: i for i, offset in enumerate(fragments.offsets)}
        if bot[0] != 0 or any(b <= a for a, b in itertools.pairwise(bot)):
            raise InvalidDatasetError("the Basic Offset Table is not increasing from 0")
        if any(offset not in index for offset in bot):
            raise InvalidDatasetError("the Basic Offset Table points between fragments")
        return [index[offset] for offset in bot]
    if frames == 1:
        return [0]
    if count == frames:
        return list(range(count))
    if EXTENDED_OFFSET_TABLE in pixels.values:
        return None
    if pixels.ts in JPEG_FAMILY:  # fragments starting with SOI start frames
        starts = [i for i, head in enumerate(fragments.heads) if head.startswith(JPEG_START)]
        if len(starts) == frames and starts[0] == 0:
            return starts
    raise InvalidDatasetError(
        f"encapsulated Pixel Data: {count} fragments for {frames} frames and no offset table"
    )


def _check_codec(
    ts: UID, geometry: Geometry, fragments: Fragments, starts: list[int] | None
) -> None:
    if ts == RLELossless:
        _check_rle(geometry, fragments)
        return
    jpeg = ts in JPEG_FAMILY
    j2k = ts in J2K_FAMILY
    if not (jpeg or j2k) or starts is None:
        return
    ends = [*(s - 1 for s in starts[1:]), len(fragments.offsets) - 1]
    for frame, (first, last) in enumerate(zip(starts, ends, strict=True), start=1):
        head = fragments.heads[first]
        if jpeg and not head.startswith(JPEG_START):
            raise InvalidDatasetError(f"frame {frame} does not start with a JPEG SOI marker")
        if j2k and not head.startswith((J2K_START, JP2_SIGNATURE)):
            raise InvalidDatasetError(f"frame {frame} does not start a JPEG 2000 codestream")
        if jpeg and not fragments.tails[last].rstrip(b"\x00").endswith(JPEG_END):
            raise InvalidDatasetError(f"frame {frame} does not end with a JPEG EOI marker (cut?)")
    size = _jpeg_size(fragments.heads[0]) if jpeg else _j2k_size(fragments.heads[0])
    if size is not None and size != (geometry.rows, geometry.columns):
        raise PixelDataError(
            f"the compressed frame is {size[1]} x {size[0]} pixels; Columns x Rows say "
            f"{geometry.columns} x {geometry.rows}"
        )


def _jpeg_size(head: bytes) -> tuple[int, int] | None:
    """(rows, columns) from the SOF segment of a JPEG / JPEG-LS codestream, if in ``head``."""
    pos = 2
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        (length,) = struct.unpack(">H", head[pos + 2 : pos + 4])
        if marker in _SOF_MARKERS:
            if pos + 9 > len(head):
                return None
            rows, columns = struct.unpack(">HH", head[pos + 5 : pos + 9])
            return (rows, columns) if rows else None  # 0: height given later (DNL)
        pos += 2 + length
    return None


def _j2k_size(head: bytes) -> tuple[int, int] | None:
    """(rows, columns) from the SIZ segment of a raw JPEG 2000 codestream."""
    if not head.startswith(J2K_START) or len(head) < 24:
        return None
    xsiz, ysiz, xo, yo = struct.unpack(">LLLL", head[8:24])
    return ysiz - yo, xsiz - xo


def _check_rle(geometry: Geometry, fragments: Fragments) -> None:
    """One fragment per frame, each with a valid RLE header (PS3.5 G.5)."""
    if len(fragments.offsets) != geometry.frames:
        raise InvalidDatasetError(
            f"RLE Pixel Data has {len(fragments.offsets)} fragments for {geometry.frames} frames"
        )
    segments = geometry.samples * ((geometry.bits + 7) // 8)
    for frame, (head, length) in enumerate(zip(fragments.heads, fragments.lengths, strict=True)):
        if len(head) < HEAD:
            raise InvalidDatasetError(f"RLE frame {frame + 1} is shorter than its header")
        count, *offsets = struct.unpack("<16L", head[:HEAD])
        used = offsets[:count]
        if count != segments or not used or used[0] != HEAD:
            raise InvalidDatasetError(f"RLE frame {frame + 1} has a broken header")
        if any(b <= a for a, b in itertools.pairwise(used)) or used[-1] >= length:
            raise InvalidDatasetError(f"RLE frame {frame + 1} has segment offsets out of range")
