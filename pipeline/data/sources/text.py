"""Delimited text files read in chunks of whole lines, every parsed row traced back to its file line.

How text is read, and why (files go up to 32M lines):

* the file (on disk or in an object store: `location.Location`) is read in chunks of whole lines
  (`CHUNK_BYTES`), so memory holds one chunk at a time; a .csv.gz is decompressed as it is read;
* a chunk is checked as UTF-8 in one call; only when that fails is it split
  into lines to find and quarantine the undecodable ones; likewise the lines
  holding a carriage return that does not end them (pyarrow would split them);
* pyarrow.csv parses the chunk with every column read as a string and an
  `invalid_row_handler` that captures lines with the wrong number of fields
  (with their text and row number);
* the parsed columns go to `convert.Converter`, which asks for the line number
  and text of a row (`_RowLines.locate`) only when it quarantines that row.
"""

from __future__ import annotations

import contextlib
import csv as pycsv
import functools
import gzip
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from tqdm import tqdm

from pipeline.core.errors import IngestError
from pipeline.data.sources.convert import Converter, Quarantine, mapped_columns
from pipeline.data.sources.parse import bad_mask

if TYPE_CHECKING:
    from pipeline.data.sources.location import Location

logger = logging.getLogger(__name__)

# Bytes of whole lines handed to the parser at once: big enough that per-chunk
# overhead vanishes, small enough to bound memory. Tests lower it to exercise
# chunk boundaries.
CHUNK_BYTES = 64 * 2**20
# pyarrow's own block size inside a chunk; 4 MiB measured fastest for the
# single-threaded parser (which we need: it numbers the rows it rejects).
ARROW_BLOCK_BYTES = 4 * 2**20

FILLER_PREFIX = "__filler_"
# What an error message may quote of a file: a token (a column name) as a repr cut at this many
# characters, never a line; a line is described by its line number, length and field counts.
QUOTED_CHARS = 16
QUOTED_TOKENS = 8


@dataclass(frozen=True)
class Delimited:
    """How to split the lines of a text file into named fields.

    pyarrow takes a one-character delimiter. A separator made of one character
    repeated, like MovieLens' "::", is parsed as that character with empty
    filler fields in between ("1::2" is "1", "", "2" split on ':'): no copy of
    the text is needed, and a filler that is not empty reveals a malformed line.
    """

    names: tuple[str, ...]
    separator: str
    quoted: bool

    def __post_init__(self) -> None:
        if not self.separator or self.separator != self.separator[0] * len(self.separator):
            raise IngestError(
                f"separator {self.separator!r} is not supported: use one character, or one character "
                "repeated such as '::'"
            )

    @property
    def parsed_names(self) -> list[str]:
        """Names of the fields pyarrow sees: the real ones, with fillers between them."""
        fillers_per_gap = len(self.separator) - 1
        out = [self.names[0]]
        for gap, name in enumerate(self.names[1:], start=1):
            out.extend(f"{FILLER_PREFIX}{gap}_{k}" for k in range(fillers_per_gap))
            out.append(name)
        return out

    @property
    def fillers(self) -> list[str]:
        return [name for name in self.parsed_names if name.startswith(FILLER_PREFIX)]

    def split(self, line: str) -> list[str]:
        if self.quoted:
            try:
                return next(pycsv.reader([line], delimiter=self.separator))
            except pycsv.Error as err:  # e.g. a carriage return inside the line
                raise IngestError(f"the first line cannot be split into fields: {err}") from None
        return line.split(self.separator)


@dataclass
class _TextChunk:
    """Whole lines of a text file; `first_line` is the 1-based file line number of the first."""

    data: bytes
    first_line: int

    @cached_property
    def _line_starts(self) -> np.ndarray:
        # Offsets where each line starts, plus len(data) (data always ends with "\n").
        newlines = np.flatnonzero(np.frombuffer(self.data, dtype=np.uint8) == ord("\n"))
        return np.concatenate(([0], newlines + 1))

    @cached_property
    def _nonblank_lines(self) -> np.ndarray:
        """0-based chunk line indexes of the lines pyarrow counts as rows (it skips blank ones)."""
        starts = self._line_starts[:-1]
        lengths = self._line_starts[1:] - 1 - starts
        data = np.frombuffer(self.data, dtype=np.uint8)
        only_cr = (lengths == 1) & (data[starts] == ord("\r"))
        return np.flatnonzero((lengths > 0) & ~only_cr)

    @cached_property
    def n_lines(self) -> int:
        return self.data.count(b"\n")

    def lines_of_row_numbers(self, numbers: np.ndarray) -> np.ndarray:
        """pyarrow's 1-based row numbers (blank lines not counted) -> file line numbers."""
        if len(numbers) == 0:
            return np.empty(0, dtype=np.int64)  # spares the scan for line starts
        return self.first_line + self._nonblank_lines[np.asarray(numbers, dtype=np.int64) - 1]

    def texts(self, file_lines: np.ndarray) -> list[str]:
        starts = self._line_starts
        texts = []
        for index in np.asarray(file_lines) - self.first_line:
            line = self.data[starts[index] : starts[index + 1] - 1]
            texts.append(line.decode("utf-8").removesuffix("\r"))
        return texts


GZIP_MAGIC = b"\x1f\x8b"


def is_gzip(path: Location) -> bool:
    with path.open() as stream:
        return stream.read(2) == GZIP_MAGIC


@contextlib.contextmanager
def open_bytes(path: Location) -> Iterator[BinaryIO]:
    """The file's bytes, decompressed on the fly when it is gzip (a .csv.gz): never a copy on disk."""
    with path.open() as raw:
        compressed = raw.peek(2)[:2] == GZIP_MAGIC
        with gzip.GzipFile(fileobj=raw, mode="rb") if compressed else contextlib.nullcontext(raw) as stream:
            yield stream


# gzip.BadGzipFile (not gzip data past the magic) is an OSError; a cut-off gzip ends in EOFError.
DECOMPRESSION_ERRORS = (OSError, EOFError)


def decompression_failed(path: Location, err: Exception) -> IngestError:
    return IngestError(f"{path} cannot be decompressed: {err or type(err).__name__}")


def _read_block(stream, path: Location, size: int) -> bytes:
    try:
        return stream.read(size)
    except DECOMPRESSION_ERRORS as err:
        raise decompression_failed(path, err) from None


def _iter_line_chunks(path: Location, start: int, first_line: int, chunk_bytes: int) -> Iterator[_TextChunk]:
    """Chunks of whole lines from (decompressed) byte offset `start` on; the last line gets its missing "\\n"."""
    size = path.size
    compressed = is_gzip(path)
    with (
        open_bytes(path) as stream,
        tqdm(
            # A gzip's decompressed size is unknown: its bar counts bytes without a total.
            total=None if compressed else size - start, unit="B", unit_scale=True, desc=path.name, leave=False,
            disable=None if size > chunk_bytes else True,
        ) as progress,
    ):
        stream.seek(start)
        carry = b""
        line = first_line
        while block := _read_block(stream, path, chunk_bytes):
            progress.update(len(block))
            block = carry + block
            cut = block.rfind(b"\n") + 1
            if cut == 0:  # a line longer than a chunk: keep reading until it ends
                carry = block
                continue
            chunk, carry = block[:cut], block[cut:]
            text_chunk = _TextChunk(chunk, line)
            yield text_chunk
            line += text_chunk.n_lines
        if carry:
            yield _TextChunk(carry + b"\n", line)


def _blank_undecodable_lines(chunk: _TextChunk, quarantine: Quarantine) -> _TextChunk:
    """Quarantine the lines that are not UTF-8 and blank them, so the rest of the chunk still parses."""
    try:
        chunk.data.decode("utf-8")
        return chunk
    except UnicodeDecodeError:
        pass
    lines = chunk.data.split(b"\n")
    bad_indexes: list[int] = []
    bad_raws: list[str] = []
    for index, line in enumerate(lines):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            bad_indexes.append(index)
            bad_raws.append(repr(line.removesuffix(b"\r")))  # repr: lossless, and a valid str
            lines[index] = b""
    quarantine.add(chunk.first_line + np.array(bad_indexes, dtype=np.int64), bad_raws, "invalid_utf8")
    return _TextChunk(b"\n".join(lines), chunk.first_line)


def _blank_lines_with_stray_carriage_returns(chunk: _TextChunk, quarantine: Quarantine) -> _TextChunk:
    """Quarantine the lines holding a CR that does not end them, and blank them.

    pyarrow ends a row at a lone CR as at a newline, so such a line would parse as two rows
    (and the rows after it would be traced to the wrong lines); lines are records here.
    """
    data = np.frombuffer(chunk.data, dtype=np.uint8)
    carriage_returns = np.flatnonzero(data == ord("\r"))
    if len(carriage_returns) == 0:
        return chunk
    stray = carriage_returns[data[carriage_returns + 1] != ord("\n")]  # data ends with "\n": +1 is in range
    if len(stray) == 0:
        return chunk
    bad_indexes = np.unique(np.searchsorted(chunk._line_starts, stray, side="right") - 1)
    quarantine.add(chunk.first_line + bad_indexes, chunk.texts(chunk.first_line + bad_indexes), "stray_carriage_return")
    lines = chunk.data.split(b"\n")
    for index in bad_indexes.tolist():
        lines[index] = b""
    return _TextChunk(b"\n".join(lines), chunk.first_line)


@dataclass
class _RejectedRows:
    """pyarrow's invalid_row_handler: records the lines that have the wrong number of fields."""

    numbers: list[int] = field(default_factory=list)  # pyarrow's 1-based row numbers
    texts: list[str] = field(default_factory=list)
    too_many: list[bool] = field(default_factory=list)

    def __call__(self, row: pacsv.InvalidRow) -> str:
        self.numbers.append(row.number)
        self.texts.append(row.text)
        self.too_many.append(row.actual_columns > row.expected_columns)
        return "skip"


class _RowLines:
    """Traces the rows of a parsed chunk back to their file lines (only ever asked for rows being quarantined)."""

    def __init__(self, chunk: _TextChunk, rejected_numbers: np.ndarray) -> None:
        self.chunk = chunk
        self._rejected_numbers = np.sort(rejected_numbers)
        self._kept_rows: np.ndarray | None = None  # set when the table was filtered after parsing

    def keep(self, kept_rows: np.ndarray) -> None:
        """The parsed table was filtered down to `kept_rows`."""
        self._kept_rows = kept_rows if self._kept_rows is None else self._kept_rows[kept_rows]

    def row_numbers(self, rows: np.ndarray) -> np.ndarray:
        """pyarrow's row numbers of table rows: table row r holds the (r+1)-th number not rejected."""
        if self._kept_rows is not None:
            rows = self._kept_rows[rows]
        # The n-th rejected number (0-based) has n rejected numbers before it, so
        # `number - n` counts the kept rows up to it; a binary search over those
        # counts finds how many rejected numbers precede each kept row.
        kept_before_rejected = self._rejected_numbers - np.arange(len(self._rejected_numbers))
        return rows + 1 + np.searchsorted(kept_before_rejected, rows + 1, side="right")

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, list[str]]:
        lines = self.chunk.lines_of_row_numbers(self.row_numbers(rows))
        return lines, self.chunk.texts(lines)


def _parse_chunk(chunk: _TextChunk, layout: Delimited, wanted: list[str]) -> tuple[pa.Table, _RejectedRows]:
    try:
        return _parse_with_arrow(chunk, layout, wanted, block_size=ARROW_BLOCK_BYTES)
    except pa.ArrowInvalid:
        # pyarrow cannot split a line longer than its block; one block for the whole chunk can.
        return _parse_with_arrow(chunk, layout, wanted, block_size=len(chunk.data) + 1)


def _parse_with_arrow(
    chunk: _TextChunk, layout: Delimited, wanted: list[str], *, block_size: int
) -> tuple[pa.Table, _RejectedRows]:
    rejected = _RejectedRows()
    columns = wanted + layout.fillers
    table = pacsv.read_csv(
        pa.BufferReader(chunk.data),
        # use_threads=False: only the serial parser numbers the rows it rejects,
        # which is how they are traced back to their line.
        read_options=pacsv.ReadOptions(column_names=layout.parsed_names, use_threads=False, block_size=block_size),
        parse_options=pacsv.ParseOptions(
            delimiter=layout.separator[0],
            quote_char='"' if layout.quoted else False,
            invalid_row_handler=rejected,
        ),
        convert_options=pacsv.ConvertOptions(
            column_types={name: pa.string() for name in columns},
            include_columns=columns,
            # An empty field is null, not "", and only an empty one: pyarrow's default null_values would
            # also turn "NA", "null", "nan", "N/A"... into nulls, losing string IDs that read so.
            strings_can_be_null=True,
            null_values=[""],
        ),
    )
    return table, rejected


def _read_text_chunk(
    chunk: _TextChunk, layout: Delimited, wanted: list[str], converter: Converter, quarantine: Quarantine
) -> tuple[pa.Table, int]:
    """One chunk -> its raw-schema rows; also how many data lines (not blank) it held."""
    quarantined_before = len(quarantine)
    chunk = _blank_lines_with_stray_carriage_returns(_blank_undecodable_lines(chunk, quarantine), quarantine)
    n_undecodable = len(quarantine) - quarantined_before  # not UTF-8, or a stray CR: blanked, set aside
    try:
        parsed, rejected = _parse_chunk(chunk, layout, wanted)
        n_rows = parsed.num_rows + len(rejected.numbers)
        if layout.quoted and (n_rows != len(chunk._nonblank_lines) or any("\n" in text for text in rejected.texts)):
            # An unbalanced quote made pyarrow swallow the following lines into one
            # row (rejected, or with the right field count accepted: fewer rows than
            # lines). Lines are records here, so this chunk is parsed again without
            # quoting: every line is then accounted for, the broken one quarantined.
            logger.warning("unbalanced quote in lines %d+; parsing that chunk without quoting", chunk.first_line)
            parsed, rejected = _parse_chunk(chunk, replace(layout, quoted=False), wanted)
    except pa.ArrowInvalid as err:
        raise IngestError(f"cannot parse the lines from line {chunk.first_line} on: {arrow_reason(err)}") from None

    rejected_numbers = np.asarray(rejected.numbers, dtype=np.int64)
    rejected_lines = chunk.lines_of_row_numbers(rejected_numbers)
    too_many = np.asarray(rejected.too_many, dtype=bool)
    texts = np.asarray(rejected.texts, dtype=object)
    quarantine.add(rejected_lines[too_many], list(texts[too_many]), "extra_fields")
    quarantine.add(rejected_lines[~too_many], list(texts[~too_many]), "missing_fields")

    # Counted from the lines, independently of the parser and of where the rows go next, so
    # `convert.finish` can check none was lost.
    n_data_lines = n_undecodable + len(chunk._nonblank_lines)
    row_lines = _RowLines(chunk, rejected_numbers)
    if layout.fillers:
        filler_used = functools.reduce(pc.or_, (pc.is_valid(parsed[name]) for name in layout.fillers))
        malformed = bad_mask(filler_used)
        if malformed is not None:
            quarantine.add(*row_lines.locate(np.flatnonzero(malformed)), "malformed_separator")
            parsed = parsed.filter(pa.array(~malformed))
            row_lines.keep(np.flatnonzero(~malformed))
    return converter.convert({name: parsed[name] for name in wanted}, row_lines.locate), n_data_lines


def read_delimited(
    path: Location, layout: Delimited, *, data_start: int, first_line: int, converter: Converter, quarantine: Quarantine
) -> tuple[list[pa.Table], dict]:
    wanted = [name for name in layout.names if name in mapped_columns(converter.columns)]
    tables: list[pa.Table] = []
    n_lines = data_lines = 0
    for chunk in _iter_line_chunks(path, data_start, first_line, CHUNK_BYTES):
        table, n_data_lines = _read_text_chunk(chunk, layout, wanted, converter, quarantine)
        tables.append(table)
        data_lines += n_data_lines
        n_lines += chunk.n_lines
    return tables, {"data_lines": data_lines, "blank_lines": n_lines - data_lines}


def peek_first_line(path: Location) -> tuple[str, int]:
    """The first line (decoded leniently, without BOM or newline) and the byte offset just after it."""
    with open_bytes(path) as stream:
        try:
            raw = stream.readline(2**20)
        except DECOMPRESSION_ERRORS as err:
            raise decompression_failed(path, err) from None
    return raw.decode("utf-8", errors="replace").removeprefix("\ufeff").rstrip("\r\n"), len(raw)


def bom_length(path: Location) -> int:
    with open_bytes(path) as stream:
        return 3 if _read_block(stream, path, 3) == b"\xef\xbb\xbf" else 0


def token(text: str) -> str:
    """A token read from a file (a column name) for an error message: a repr cut at QUOTED_CHARS characters."""
    return repr(text[:QUOTED_CHARS]) + ("..." if len(text) > QUOTED_CHARS else "")


def tokens(texts: list[str]) -> str:
    """Up to QUOTED_TOKENS tokens, each cut by `token`, as a list."""
    more = f", and {len(texts) - QUOTED_TOKENS} more" if len(texts) > QUOTED_TOKENS else ""
    return "[" + ", ".join(token(text) for text in texts[:QUOTED_TOKENS]) + more + "]"


def arrow_reason(err: Exception) -> str:
    """pyarrow's message without what it quotes of the data ("Expected 4 columns, got 1: <the row>")."""
    parts = str(err).splitlines()[0].split(": ") if str(err) else [type(err).__name__]
    return ": ".join(parts[:2])[:120]


def describe_line(line: str) -> str:
    """How a line splits, without quoting it (it may be any file's content)."""
    candidates = (("\t", "tab"), ("::", "'::'"), (",", "comma"), (";", "semicolon"), ("|", "pipe"), (" ", "space"))
    n_fields, name = max((len(line.split(sep)), name) for sep, name in candidates)
    if n_fields > 1:
        return f"{len(line)} characters long, which looks like {n_fields} {name}-separated fields"
    return f"{len(line)} characters long, with no tab, '::', comma, semicolon, pipe or space in it"
