"""Full structural check of a stored or received Part-10 file, in one streaming pass.

The node acknowledges only what can be read in full, so before a received file is renamed into
storage every byte of its dataset is walked in the transfer syntax named in its file meta (the
negotiated one): each element header, every length against the data that is really there,
sequences and items to their delimiters, encapsulated Pixel Data to its sequence delimiter,
and the end of the data. Refused (with the reason):

- data that ends inside an element (a truncated transfer) or bytes after the dataset's end;
- element headers that are not valid in the negotiated syntax: an explicit VR syntax whose
  "VR" bytes are no VR (implicit VR bytes on an explicit context) or implicit VR data whose
  lengths are really explicit VR headers; pydicom would silently switch VR mode, we do not;
- Pixel Data problems (:mod:`dicom_node.storage.pixels`).

Tolerated on purpose (they are common and readable): odd value lengths outside Pixel Data,
elements out of order before Pixel Data, a non-zero reserved field in long explicit VR headers,
and the one trailing pad byte of a deflated stream.

The file is read in chunks of :data:`CHUNK` bytes (a deflated stream is inflated in bounded
steps), so memory does not grow with the instance; the same pass computes the SHA-256 of the
dataset bytes that the index keeps.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.uid import UID

from dicom_node.errors import EncodingMismatchError, InvalidDatasetError
from dicom_node.storage.pixels import (
    PIXEL_VALUE_TAGS,
    PixelChecker,
    PixelLimits,
    check_fragments,
    skip_fragments,
)

CHUNK = 1 << 20
UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
MAX_DEPTH = 64
"""Deepest sequence nesting accepted (real objects nest a few levels; this bounds recursion)."""
MAX_META_LENGTH = 1 << 20
MAX_IMPLICIT_GUESS = 1 << 24
"""An element header read as implicit VR with a length up to this is taken for implicit VR
data (a clearer refusal than "garbage")."""
_PREAMBLE = 128

VRS = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL "
    b"UN UR US UT UV".split()
)
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
"""Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2)."""


_STRUCTS = {
    little: (struct.Struct(e + "HHL"), struct.Struct(e + "H"), struct.Struct(e + "L"))
    for little, e in ((True, "<"), (False, ">"))
}
"""(tag + 4-byte length, 2-byte value, 4-byte value) layouts by endianness."""


@functools.lru_cache(maxsize=8192)
def _dictionary_sequence(tag: int) -> bool:
    """Whether the data dictionary says ``tag`` is a sequence (implicit VR has no VR)."""
    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:
        return False


class EndOfData(Exception):  # noqa: N818 - control flow inside this module
    """The data ended before ``missing`` more bytes could be read."""

    def __init__(self, missing: int) -> None:
        super().__init__(missing)
        self.missing = missing


def tag_name(tag: int) -> str:
    """``(gggg,eeee) Keyword`` for messages."""
    keyword = keyword_for_tag(tag)
    text = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    return f"{text} {keyword}" if keyword else text


class Reader:
    """The dataset bytes of an open file, read once in order, hashing every raw byte.

    ``pos`` counts the bytes of the (inflated) dataset stream consumed so far.
    """

    def __init__(self, fh: BinaryIO, *, deflated: bool) -> None:
        self._fh = fh
        self._hash = hashlib.sha256()
        self._buf = bytearray()
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS) if deflated else None
        self.raw_size = 0
        self.pos = 0

    def _more(self) -> bool:
        """Add decoded bytes to the buffer; False when there are none left."""
        inflater = self._inflater
        while True:
            if inflater is not None and inflater.unconsumed_tail:
                data = inflater.decompress(inflater.unconsumed_tail, CHUNK)
            elif inflater is not None and inflater.eof:
                return False
            else:
                raw = self._fh.read(CHUNK)
                if not raw:
                    return False
                self._hash.update(raw)
                self.raw_size += len(raw)
                data = raw if inflater is None else inflater.decompress(raw, CHUNK)
            if data:
                self._buf += data
                return True

    def read(self, n: int) -> bytes:
        """The next ``n`` bytes; :class:`EndOfData` when fewer are left."""
        buf = self._buf
        if n <= len(buf):
            out = bytes(buf[:n])
            del buf[:n]
            self.pos += n
            return out
        while len(self._buf) < n:
            if not self._more():
                raise EndOfData(n - len(self._buf))
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self.pos += n
        return out

    def skip(self, n: int, *, keep_head: int = 0, keep_tail: int = 0) -> tuple[bytes, bytes]:
        """Consume ``n`` bytes; return the first ``keep_head`` and last ``keep_tail`` of them."""
        if not keep_head and not keep_tail and n <= len(self._buf):  # the common small value
            del self._buf[:n]
            self.pos += n
            return b"", b""
        head = bytearray()
        tail = b""
        left = n
        while left:
            if not self._buf and not self._more():
                raise EndOfData(left)
            take = min(left, len(self._buf))
            chunk = self._buf[:take]
            if len(head) < keep_head:
                head += chunk[: keep_head - len(head)]
            if keep_tail:
                tail = (tail + bytes(chunk[-keep_tail:]))[-keep_tail:]
            del self._buf[:take]
            left -= take
            self.pos += take
        return bytes(head), tail

    def available(self, n: int) -> int:
        """How many of the next ``n`` bytes exist (without consuming or copying them)."""
        while len(self._buf) < n and self._more():
            pass
        return min(n, len(self._buf))

    def peek(self, n: int) -> bytes:
        """Up to ``n`` next bytes, without consuming them."""
        while len(self._buf) < n and self._more():
            pass
        return bytes(self._buf[:n])

    def at_end(self) -> bool:
        """True when no dataset bytes are left."""
        return not self._buf and not self._more()

    def trailing_raw(self) -> int:
        """Raw bytes after the end of a deflated stream (read and hashed, but not data)."""
        if self._inflater is None:
            return 0
        extra = len(self._inflater.unused_data)
        while raw := self._fh.read(CHUNK):
            self._hash.update(raw)
            self.raw_size += len(raw)
            extra += len(raw)
        return extra

    @property
    def deflate_complete(self) -> bool:
        """For a deflated stream: its end was reached (a cut stream never reaches it)."""
        return self._inflater is None or self._inflater.eof

    def hexdigest(self) -> str:
        """SHA-256 of every raw byte read."""
        return self._hash.hexdigest()


@dataclass(frozen=True)
class CheckedFile:
    """A Part-10 file that passed :func:`check_file`."""

    transfer_syntax_uid: str
    dataset_offset: int
    size: int
    sha256: str
    frames: int


class Walker:
    """Walks elements, sequences and items of one dataset stream (see module docstring)."""

    def __init__(self, reader: Reader, ts: UID, pixels: PixelChecker) -> None:
        self.r = reader
        self.implicit = bool(ts.is_implicit_VR)
        self.encapsulated = bool(ts.is_encapsulated)
        self.pixels = pixels
        self.depth = 0
        self.little = bool(ts.is_little_endian)

    @property
    def little(self) -> bool:
        """Whether the data being walked is little endian."""
        return self._e == "<"

    @little.setter
    def little(self, value: bool) -> None:
        self._e = "<" if value else ">"
        self._tag_length = _STRUCTS[value][0]
        self._short = _STRUCTS[value][1]
        self._long = _STRUCTS[value][2]

    def header(self) -> tuple[int, bytes | None, int]:
        """(tag, explicit VR or None, value length) of the next element or item."""
        raw = self.r.read(8)
        group, elem, length = self._tag_length.unpack(raw)
        tag = group << 16 | elem
        if group == 0xFFFE or self.implicit:
            return tag, None, length
        vr = raw[4:6]
        if vr not in VRS:
            raise self._not_an_element(tag, raw)
        if vr in LONG_VRS:
            return tag, vr, self._long.unpack(self.r.read(4))[0]
        return tag, vr, self._short.unpack_from(raw, 6)[0]

    def _not_an_element(self, tag: int, raw: bytes) -> InvalidDatasetError:
        """The error for an explicit VR element header without a valid VR."""
        if self.depth == 0 and self.pixels.seen_pixels:
            return InvalidDatasetError("data follows the end of the dataset (after Pixel Data)")
        group = tag >> 16
        (implicit_length,) = struct.unpack(self._e + "L", raw[4:])
        known = bool(keyword_for_tag(tag)) or group % 2 == 1
        if group not in (0x0000, 0x0002) and known and implicit_length <= MAX_IMPLICIT_GUESS:
            return EncodingMismatchError(
                f"element {tag_name(tag)} has no valid VR ({raw[4:6]!r}): the data looks "
                "implicit VR, not explicit VR as negotiated"
            )
        return InvalidDatasetError(f"no valid data element at {tag_name(tag)} (garbage?)")

    def is_sequence(self, tag: int, vr: bytes | None, length: int) -> bool:
        """Whether the element's value holds items (in implicit VR: by the dictionary)."""
        if vr is not None:
            return vr == b"SQ" or (vr == b"UN" and length == UNDEFINED)
        return length == UNDEFINED or _dictionary_sequence(tag)

    def dataset(self, end: int | None, *, top: bool = False) -> None:
        """Walk elements up to ``end`` (None: to the end of the data; UNDEFINED: to an item
        delimiter)."""
        while True:
            if end is None:
                left = self.r.available(8)
                if left == 0:
                    return
                if left < 8:
                    raise InvalidDatasetError(f"{left} bytes follow the end of the dataset")
            if end is not None and end != UNDEFINED and self.r.pos >= end:
                if self.r.pos > end:
                    raise InvalidDatasetError("an element runs past the end of its item")
                return
            tag, vr, length = self.header()
            if tag == ITEM_DELIMITER and end == UNDEFINED:
                return
            if tag >> 16 == 0xFFFE:
                raise InvalidDatasetError(f"unexpected {tag_name(tag)} inside a dataset")
            if top:
                self.pixels.order(tag, tag_name)
            self.value(tag, vr, length, top=top)

    def value(self, tag: int, vr: bytes | None, length: int, *, top: bool) -> None:
        """Consume one element's value (descending into sequences)."""
        if tag == PIXEL_DATA and length == UNDEFINED:
            if not top:
                skip_fragments(self, tag_name(tag))
            elif not self.encapsulated:
                raise InvalidDatasetError(
                    "encapsulated (compressed) Pixel Data in a native transfer syntax"
                )
            else:
                try:
                    check_fragments(self, self.pixels)
                except EndOfData:
                    raise InvalidDatasetError(
                        "the data ends inside encapsulated Pixel Data (truncated?)"
                    ) from None
            return
        if self.is_sequence(tag, vr, length):
            self.sequence(tag, length, implicit_un=vr == b"UN")
            return
        if length == UNDEFINED:
            raise InvalidDatasetError(f"{tag_name(tag)} has an undefined length")
        try:
            if top and tag in PIXEL_VALUE_TAGS:
                self.pixels.value(tag, self.r.read(length), little=self.little)
            elif top and tag == PIXEL_DATA:
                if self.encapsulated:
                    raise EncodingMismatchError(
                        "Pixel Data is not encapsulated although the transfer syntax is"
                    )
                self.r.skip(length)
                self.pixels.native(length)
            else:
                self.r.skip(length)
        except EndOfData as exc:
            raise InvalidDatasetError(
                f"the data ends inside {tag_name(tag)}: {length - exc.missing} of {length} "
                "bytes present (truncated?)"
            ) from None

    def sequence(self, tag: int, length: int, *, implicit_un: bool) -> None:
        """Walk the items of a sequence (a UN of undefined length holds implicit VR LE)."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise InvalidDatasetError(f"sequences nested more than {MAX_DEPTH} deep")
        saved = (self.implicit, self.little)
        if implicit_un:
            self.implicit, self.little = True, True
        end = UNDEFINED if length == UNDEFINED else self.r.pos + length
        try:
            while end == UNDEFINED or self.r.pos < end:
                item, _, item_length = self.header()
                if item == SEQUENCE_DELIMITER and end == UNDEFINED:
                    break
                if item != ITEM:
                    raise InvalidDatasetError(f"{tag_name(tag)} holds {tag_name(item)}, no item")
                item_end = UNDEFINED if item_length == UNDEFINED else self.r.pos + item_length
                self.dataset(item_end)
            if end != UNDEFINED and self.r.pos != end:
                raise InvalidDatasetError(f"an item runs past the end of {tag_name(tag)}")
        finally:
            self.implicit, self.little = saved
            self.depth -= 1


def _meta(fh: BinaryIO) -> tuple[str, int]:
    """(TransferSyntaxUID, dataset offset) from the file meta (always explicit VR LE)."""
    head = fh.read(_PREAMBLE + 16)
    if len(head) < _PREAMBLE + 12 or head[_PREAMBLE : _PREAMBLE + 4] != b"DICM":
        raise InvalidDatasetError("not DICOM Part-10 data (no 'DICM' prefix)")
    if head[_PREAMBLE + 4 : _PREAMBLE + 10] != b"\x02\x00\x00\x00UL":
        raise InvalidDatasetError("file meta has no group length element")
    (group_len,) = struct.unpack("<L", head[_PREAMBLE + 12 : _PREAMBLE + 16])
    if group_len > MAX_META_LENGTH:
        raise InvalidDatasetError(f"file meta group length {group_len} is implausible")
    meta = fh.read(group_len)
    if len(meta) != group_len:
        raise InvalidDatasetError("the data ends inside the file meta")
    ts = _meta_transfer_syntax(meta)
    return ts, _PREAMBLE + 16 + group_len


def _meta_transfer_syntax(meta: bytes) -> str:
    pos = 0
    while pos + 8 <= len(meta):
        group, elem = struct.unpack("<HH", meta[pos : pos + 4])
        vr = meta[pos + 4 : pos + 6]
        if vr in LONG_VRS:
            (length,) = struct.unpack("<L", meta[pos + 8 : pos + 12])
            pos += 12
        else:
            (length,) = struct.unpack("<H", meta[pos + 6 : pos + 8])
            pos += 8
        if (group, elem) == (0x0002, 0x0010):
            return meta[pos : pos + length].decode("ascii", "replace").strip(" \x00")
        pos += length
    raise InvalidDatasetError("file meta names no transfer syntax")


def check_file(
    path: Path, *, limits: PixelLimits, transfer_syntax: str | None = None
) -> CheckedFile:
    """Walk the whole file at ``path``; raise an :class:`InvalidDatasetError` subclass on the
    first problem (see module docstring). ``transfer_syntax``: the negotiated syntax, which the
    file meta must name."""
    with path.open("rb") as fh:
        ts_uid, offset = _meta(fh)
        if transfer_syntax is not None and ts_uid != transfer_syntax:
            raise EncodingMismatchError(
                f"file meta names transfer syntax {ts_uid}, negotiated {transfer_syntax}"
            )
        ts = UID(ts_uid)
        if not ts.is_transfer_syntax:
            raise InvalidDatasetError(f"unknown transfer syntax {ts_uid[:64]!r}")
        reader = Reader(fh, deflated=bool(ts.is_deflated))
        pixels = PixelChecker(limits, ts)
        walker = Walker(reader, ts, pixels)
        try:
            _first_element_plausible(walker)
            walker.dataset(None, top=True)
        except EndOfData:
            raise InvalidDatasetError("the data ends inside an element header") from None
        except zlib.error as exc:
            raise InvalidDatasetError(f"the deflated dataset cannot be inflated: {exc}") from None
        if not reader.deflate_complete:
            raise InvalidDatasetError("the deflated dataset ends before its deflate stream")
        extra = reader.trailing_raw()
        if extra > 1:  # PS3.5 A.5: one pad byte may follow an odd-length deflate stream
            raise InvalidDatasetError(f"{extra} bytes follow the end of the deflated dataset")
        frames = pixels.finish()
        return CheckedFile(ts_uid, offset, offset + reader.raw_size, reader.hexdigest(), frames)


def _first_element_plausible(walker: Walker) -> None:
    """Catch the common encoding mix-ups on the first element, with a clear reason.

    Implicit VR data whose first "length" is really a VR and a 2-byte length is explicit VR
    data; a first tag that reads as (0008,xxxx) only when byte-swapped is the other endianness.
    """
    r = walker.r
    if r.at_end():
        raise InvalidDatasetError("the dataset is empty")
    peek = r.peek(8)
    if len(peek) < 8:
        return
    group_le, group_be = struct.unpack("<H", peek[:2])[0], struct.unpack(">H", peek[:2])[0]
    group = group_le if walker.little else group_be
    other = group_be if walker.little else group_le
    if other in (0x0002, 0x0008) and group not in (0x0002, 0x0008):
        raise EncodingMismatchError(
            "the dataset is in the other byte order than the negotiated transfer syntax"
        )
    if walker.implicit and peek[4:6] in VRS and peek[6:8] != b"\x00\x00":
        raise EncodingMismatchError(
            "the dataset is explicit VR although the negotiated transfer syntax is implicit VR"
        )
