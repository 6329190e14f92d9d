"""The text encoding of a competition's CSV files (labels file, sample submission): UTF-8, a leading
UTF-8 byte-order mark allowed. Anything else (Latin-1 or Windows-1252 from a spreadsheet, UTF-16 from
Excel's "Unicode Text") is refused naming the file, the row and byte offset of the first byte that is
not UTF-8, and what to do, before a CSV reader could turn it into a baffling column or id error."""

from __future__ import annotations

import codecs
from pathlib import Path

from pipeline.errors import BadInputError

RESAVE = "re-save the file as UTF-8 (a spreadsheet's \"CSV UTF-8\", or `iconv -f <its encoding> -t UTF-8`)"
# UTF-32's marks first: UTF-32-LE's starts with UTF-16-LE's.
WIDE_BYTE_ORDER_MARKS = {
    codecs.BOM_UTF32_LE: "UTF-32 (little-endian)",
    codecs.BOM_UTF32_BE: "UTF-32 (big-endian)",
    codecs.BOM_UTF16_LE: "UTF-16 (little-endian)",
    codecs.BOM_UTF16_BE: "UTF-16 (big-endian)",
}
CONTEXT_BYTES = 24  # shown either side of a bad byte


def require_utf8(data: bytes, label: Path | str) -> None:
    """``BadInputError`` naming ``label`` unless ``data`` is UTF-8 text without NUL bytes."""
    mark = next((mark for mark in WIDE_BYTE_ORDER_MARKS if data.startswith(mark)), None)
    if mark is not None:
        raise BadInputError(label, f"{WIDE_BYTE_ORDER_MARKS[mark]} text, not UTF-8 (it starts with the byte-order "
                                   f"mark {mark.hex(' ')}): {RESAVE}", row=1)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadInputError(label, not_utf8(data, err.start, err.reason), row=line_of(data, err.start)) from None
    nul = data.find(b"\x00")
    if nul >= 0:
        raise BadInputError(label, f"not text: a NUL byte at byte offset {nul} (UTF-16 without a byte-order mark?): "
                                   f"{RESAVE}", row=line_of(data, nul))


def not_utf8(data: bytes, offset: int, reason: str) -> str:
    """The problem at the first undecodable byte, with its neighbourhood read as Windows-1252 (a superset
    of Latin-1's printable characters), the usual culprit."""
    line_start = data.rfind(b"\n", 0, offset) + 1
    line_end = data.find(b"\n", offset)
    if line_end < 0:  # the last line
        line_end = len(data)
    around = data[max(line_start, offset - CONTEXT_BYTES):min(line_end, offset + CONTEXT_BYTES)]
    text = around.decode("cp1252", errors="replace").strip()
    return (f"not UTF-8 text: byte 0x{data[offset]:02x} at byte offset {offset} ({reason}); read as Latin-1 or "
            f"Windows-1252 it says {text!r}: {RESAVE}")


def line_of(data: bytes, offset: int) -> int:
    """The 1-based line holding byte ``offset`` (the row a CSV reader numbers it by: header = row 1)."""
    return data.count(b"\n", 0, offset) + 1
