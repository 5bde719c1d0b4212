"""Raw text files (plain or gzip, told apart by their magic bytes) as clean, line-aligned blocks.

``TextFile`` streams a file in blocks of about ``block_bytes`` that end at a line end, each with the line
number of every line in it, so memory stays bounded whatever the file size. ``restrict`` limits it to a
:class:`Span`, a byte range of a plain file cut at line ends, so several processes can read one big file.
Lines that are not clean UTF-8 text leave the block as rejects with their line number, before any parser sees
them:

- ``bad_encoding``: invalid UTF-8, a NUL byte, or a carriage return that does not end the line;
- ``line_too_long``: a line of more than ``block_bytes`` bytes (skipped without holding it in memory);
- ``field_count``: an empty line (it holds no fields), taken out by :meth:`Block.checked_lines`, which a
  parser calls when its rows do not match the lines one to one (finding them costs a pass per line).

The checks of a clean block are a few byte scans (``memchr``, ASCII test), no per-line Python work.

Whole-file problems are one :class:`RecopsError` naming the file and the fix: empty, binary, UTF-16/32,
another compression format, a Parquet file read as text, a corrupt gzip stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa

from recops.errors import RecopsError

SNIFF_BYTES = 64 << 10
PREVIEW_CHARS = 4096
_GZIP = b"\x1f\x8b"
_OTHER_FORMATS = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip"}
_UTF16_32 = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")
_UTF8_BOM = b"\xef\xbb\xbf"
_CONTROL = bytes(b for b in range(32) if b not in b"\t\n\r\f") + b"\x7f"
_BINARY_FRACTION = 0.1  # more non-text bytes than this in the first 64 KiB: not a text file


@dataclass(frozen=True)
class Span:
    """Bytes ``[start, stop)`` of a plain text file, ``start`` at the beginning of line ``first_line``."""

    start: int
    stop: int
    first_line: int


@dataclass
class Block:
    """Whole clean lines (each ending in ``\\n``) with their line numbers, and the lines taken out."""

    data: bytes
    lines: np.ndarray  # int64 line number of each line in ``data``
    rejects: list[tuple[int, str, str]] = field(default_factory=list)  # (line, reason, text)
    _line_ends: np.ndarray | None = field(default=None, repr=False)

    def checked_lines(self) -> Block:
        """This block with every line checked on its own: empty and unclean lines become rejects."""
        kept, numbers, rejects = [], [], list(self.rejects)
        for number, line in zip(self.lines.tolist(), self.data.split(b"\n")):
            reason = _line_problem(line)
            if reason:
                rejects.append((number, reason, preview(line)))
            else:
                kept.append(line)
                numbers.append(number)
        body = b"\n".join(kept) + b"\n" if kept else b""
        return Block(body, np.array(numbers, dtype=np.int64), rejects)

    def span(self, start: int, stop: int) -> bytes:
        """The bytes of lines ``start`` to ``stop - 1`` (0-based, in ``data``), each ending in ``\\n``."""
        ends = self._ends()
        return self.data[ends[start - 1] + 1 if start else 0 : ends[stop - 1] + 1]

    def line_text(self, index: int) -> str:
        """The text of line ``index`` (0-based, in ``data``) without its line end."""
        return self.span(index, index + 1).rstrip(b"\r\n").decode()

    def _ends(self) -> np.ndarray:
        if self._line_ends is None:
            self._line_ends = np.flatnonzero(np.frombuffer(self.data, np.uint8) == 10)
        return self._line_ends


def preview(raw: bytes | str, size: int | None = None) -> str:
    """One printable line for a rejected row: bad bytes as ``\\xNN``, NUL and line ends escaped, a row of more
    than ``PREVIEW_CHARS`` characters cut and followed by its size in bytes."""
    raw = raw.encode() if isinstance(raw, str) else raw
    size = len(raw) if size is None else size
    text = raw[: PREVIEW_CHARS * 4].rstrip(b"\r\n").decode("utf-8", "backslashreplace")
    text = text.replace("\0", "\\x00").replace("\r", "\\r").replace("\n", "\\n")
    return text if size <= PREVIEW_CHARS else f"{text[:PREVIEW_CHARS]}... ({size} bytes)"


class TextFile:
    """A plain or gzip text file read as :class:`Block` s; ``header()`` takes the first line off first."""

    def __init__(self, path: Path, block_bytes: int = 16 << 20):
        self.path = Path(path)
        self.block_bytes = block_bytes
        self._stream, self._gzip = _open(self.path)
        self._line = 1
        self._pos, self._stop = 0, None  # bytes read from the stream; where to stop reading
        try:
            self._pending = self._sniff()
        except BaseException:
            self._stream.close()
            raise

    def __enter__(self) -> TextFile:
        return self

    def __exit__(self, *exc) -> None:
        self._stream.close()

    def first_lines(self, count: int = 100) -> list[bytes]:
        """Up to ``count`` complete lines from the start of what is left (nothing is consumed)."""
        return [line.rstrip(b"\r") for line in self._pending.split(b"\n", count)[:-1]]

    def header(self) -> str:
        """Take the first line off (a CSV header) and return it."""
        data = self._pending
        while b"\n" not in data and len(data) <= self.block_bytes:
            more = self._read(self.block_bytes)
            if not more:
                break
            data += more
        end = data.find(b"\n")
        if end < 0 and len(data) > self.block_bytes:
            raise RecopsError(
                f"input {self.path}: the header line is longer than {self.block_bytes} bytes; is it a CSV file?"
            )
        line, self._pending = (data, b"") if end < 0 else (data[:end], data[end + 1 :])
        self._line += 1
        try:
            return line.rstrip(b"\r").decode()
        except UnicodeDecodeError as exc:
            raise RecopsError(
                f"input {self.path}: the header line is not UTF-8 ({exc}); re-encode the file as UTF-8"
            ) from exc

    def restrict(self, span: Span) -> None:
        """Read only ``span`` from here on. A span after the first starts afresh at its own line (the file's
        start, where the layout is read, was sniffed already); the first keeps what ``header()`` took."""
        if self._gzip:
            raise ValueError(f"{self.path}: a gzip stream cannot be read from an offset")
        if span.start:
            self._stream.seek(span.start)
            self._pos, self._pending, self._line = span.start, b"", span.first_line
        self._pending = self._pending[: max(span.stop - (self._pos - len(self._pending)), 0)]
        self._stop = span.stop

    def blocks(self) -> Iterator[Block]:
        """The rest of the file as clean blocks (a block may hold no line, only rejects)."""
        carry, self._pending = self._pending, b""
        while True:
            more = self._read(self.block_bytes)
            data = carry + more if carry else more
            rejects = []
            if data.find(b"\n", 0, self.block_bytes + 1) < 0 and len(data) > self.block_bytes:
                data, rejects = self._skip_long_line(data)
            if more:
                cut = data.rfind(b"\n") + 1
                data, carry = data[:cut], data[cut:]
            elif data and not data.endswith(b"\n"):
                data += b"\n"
            if data or rejects:
                yield self._clean(data, rejects)
            if not more:
                return

    def _skip_long_line(self, data: bytes) -> tuple[bytes, list[tuple[int, str, str]]]:
        """Read past a line longer than a block: (what follows it, its reject)."""
        head, size = data[: PREVIEW_CHARS * 4], 0
        while (end := data.find(b"\n")) < 0:
            size += len(data)
            data = self._read(self.block_bytes)
            if not data:
                break
        size += max(end, 0)
        reject = (self._line, "line_too_long", preview(head, size))
        self._line += 1
        return (data[end + 1 :] if end >= 0 else b""), [reject]

    def _clean(self, data: bytes, rejects: list) -> Block:
        """A block of whole lines, with the lines that are not clean text taken out."""
        count = data.count(b"\n")
        first, self._line = self._line, self._line + count
        block = Block(data, np.arange(first, first + count, dtype=np.int64), rejects)
        return block if _is_text(data) else block.checked_lines()

    def _read(self, size: int) -> bytes:
        if self._stop is not None:
            size = max(min(size, self._stop - self._pos), 0)
        try:
            data = self._stream.read(size)
        except (OSError, pa.ArrowException) as exc:
            problem = "the gzip stream is corrupt or truncated" if self._gzip else "cannot read it"
            raise RecopsError(f"input {self.path}: {problem} ({exc}); re-download or re-create the file") from exc
        self._pos += len(data)
        return data

    def _sniff(self) -> bytes:
        """The first bytes, checked: not empty, not binary, not UTF-16/32 (a UTF-8 BOM is dropped)."""
        data = self._read(SNIFF_BYTES)
        if not data:
            raise RecopsError(
                f"input {self.path}: empty file (no bytes{' after gunzip' if self._gzip else ''}); "
                "pass a file with rows"
            )
        if data.startswith(_UTF8_BOM):
            data = data[len(_UTF8_BOM) :]
        if data.startswith(b"PAR1"):
            raise RecopsError(f"input {self.path}: a Parquet file; set format: parquet in the column spec (--spec)")
        if data.startswith(_UTF16_32) or data[:64].count(b"\0") > 16:
            raise RecopsError(
                f"input {self.path}: UTF-16 or UTF-32 text; recops reads UTF-8: convert it, e.g. "
                f"iconv -f UTF-16 -t UTF-8 {self.path.name} > {self.path.stem}.utf8{self.path.suffix}"
            )
        share = _non_text_share(data)
        if share > _BINARY_FRACTION:
            raise RecopsError(
                f"input {self.path}: binary data, not text ({share:.0%} of the first {len(data)} bytes "
                "are control bytes or invalid UTF-8); pass a Criteo TSV or CSV file (UTF-8, plain or "
                "gzip), or a Parquet file with format: parquet"
            )
        return data


def _open(path: Path) -> tuple[BinaryIO, bool]:
    """The file as a byte stream, gunzipped (Arrow's zlib stream) when its magic bytes say gzip; is it gzip."""
    with open(path, "rb") as fh:
        magic = fh.read(6)
    for prefix, name in _OTHER_FORMATS.items():
        if magic.startswith(prefix):
            raise RecopsError(
                f"input {path}: {name}-compressed; recops reads plain or gzip text: decompress it "
                f"(or recompress it with gzip)"
            )
    if magic.startswith(_GZIP):
        return pa.CompressedInputStream(pa.OSFile(str(path)), "gzip"), True
    return open(path, "rb"), False


def _non_text_share(data: bytes) -> float:
    """Share of control bytes and of bytes of invalid UTF-8 (a character cut at the end counts too)."""
    control = len(data) - len(data.translate(None, _CONTROL))
    invalid = data.decode("utf-8", "replace").count("\ufffd") if not data.isascii() else 0
    return (control + invalid) / len(data)


def _is_text(data: bytes) -> bool:
    """No NUL byte, stray carriage return or invalid UTF-8 in a block of whole lines."""
    if b"\0" in data or b"\r" in data and data.count(b"\r") != data.count(b"\r\n"):
        return False
    if data.isascii():
        return True
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _line_problem(line: bytes) -> str | None:
    """Why one line (without its ``\\n``) cannot be parsed, or None."""
    body = line[:-1] if line.endswith(b"\r") else line
    if not body:
        return "field_count"
    if b"\0" in body or b"\r" in body:
        return "bad_encoding"
    if not body.isascii():
        try:
            body.decode()
        except UnicodeDecodeError:
            return "bad_encoding"
    return None
