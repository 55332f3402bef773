"""Any CSV or Parquet file of interactions -> the raw interactions table (`read_file`).

Columns are mapped by `FileConfig.columns`; CSV goes through `text`, Parquet is
read in batches of PARQUET_BATCH_ROWS, and both are converted by `convert.Converter`.

Also read directly: a gzip-compressed CSV (.csv.gz, decompressed as it is read), a
directory of Parquet files (every *.parquet under it, in sorted path order, as one table;
partition values in directory names are not read), and RecBole atomic files (.inter: tab
separated, a header of `name:type` fields such as `user_id:token`; the `:type` is dropped).

The path may be an object-store URI (s3://bucket/logs/, `location.Location`): the same formats are
read from it in the same batches, with nothing copied to local disk.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.config import ColumnMapping, FileConfig
from pipeline.core.errors import IngestError
from pipeline.data.sources.convert import Converter, Locate, Quarantine, ReadResult, finish, mapped_columns
from pipeline.data.sources.location import Location
from pipeline.data.sources.text import (
    GZIP_MAGIC,
    Delimited,
    arrow_reason,
    bom_length,
    describe_line,
    is_gzip,
    peek_first_line,
    read_delimited,
    tokens,
)

logger = logging.getLogger(__name__)

PARQUET_BATCH_ROWS = 1_000_000
PARQUET_SUFFIXES = {".parquet", ".pq", ".parq"}
INTER_SUFFIX = ".inter"


def _file_format(path: Location, configured: str) -> str:
    if path.is_dir():
        if configured not in ("auto", "parquet"):
            raise IngestError(f"{path} is a directory: only a directory of Parquet files can be read (format auto or parquet)")
        return "parquet"
    with path.open() as stream:
        magic = stream.read(4)
    compressed = magic[:2] == GZIP_MAGIC
    if magic == b"PK\x03\x04" or (compressed and configured == "parquet"):
        raise IngestError(f"{path} is a compressed archive ({'gzip' if compressed else 'zip'}); decompress it first "
                          "(only CSV and .inter files are read gzip-compressed)")
    if configured != "auto":
        return configured
    suffixes = [suffix.lower() for suffix in path.suffixes[-2:]]
    if compressed and suffixes[-1:] == [".gz"]:
        suffixes.pop()
    if suffixes[-1:] == [INTER_SUFFIX]:
        return "inter"
    return "parquet" if suffixes[-1:] and suffixes[-1] in PARQUET_SUFFIXES or magic == b"PAR1" else "csv"


def _check_mapped_columns(path: Location, columns: ColumnMapping, found: list[str], hint: str = "") -> None:
    mapped = mapped_columns(columns)
    missing = [name for name in mapped if name not in found]
    if missing:
        raise IngestError(
            f"{path}: column(s) {missing} named in ingest.file.columns are missing; the file has {tokens(found)}{hint}"
        )


def _read_csv(
    path: Location, cfg: FileConfig, file_format: str, converter: Converter, quarantine: Quarantine
) -> tuple[list[pa.Table], dict]:
    inter = file_format == "inter"
    sep, header = ("\t", True) if inter else (cfg.sep, cfg.header)
    quoted = len(sep) == 1 and not inter  # RecBole does not quote
    first_line, first_line_end = peek_first_line(path)
    if first_line_end == 0:  # a gzip of nothing: the file itself is not 0 bytes
        raise IngestError(f"{path} is empty: it holds no lines")
    if not first_line.strip():
        raise IngestError(f"{path}: line 1 is blank; the columns are read from it, so the "
                          f"{'header' if header else 'first data line'} must be line 1")
    fields = Delimited(("probe",), sep, quoted).split(first_line)
    if header:
        # RecBole's header fields are `name:type` (user_id:token, timestamp:float): the name is the column.
        names = [name.strip().rsplit(":", 1)[0] if inter else name.strip() for name in fields]
        data_start, first_data_line = first_line_end, 2
        hint = ""
    else:
        names = [str(position) for position in range(len(fields))]
        data_start, first_data_line = bom_length(path), 1
        hint = " (header is false, so columns are named by position: '0', '1', ...)"
    if len(names) == 1 and len(mapped_columns(cfg.columns)) > 1:
        hint += (
            f". The first line parses as a single column with sep={sep!r}: the separator is probably wrong "
            f"(its first line is {describe_line(first_line)})"
        )
    _check_mapped_columns(path, cfg.columns, names, hint)
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise IngestError(f"{path}: the header repeats column name(s) {tokens(duplicated)}; names must be unique")
    layout = Delimited(tuple(names), sep, quoted)
    tables, counts = read_delimited(
        path, layout, data_start=data_start, first_line=first_data_line, converter=converter, quarantine=quarantine
    )
    return tables, {"separator": sep, "header": header, "gzip": is_gzip(path), **counts}


def _parquet_locator(rows_table: pa.Table, offset: int) -> Locate:
    """Rows of a batch -> their row index in the file and the row as JSON (its `raw`)."""

    def locate(rows: np.ndarray) -> tuple[np.ndarray, list[str]]:
        records = rows_table.take(pa.array(rows)).to_pylist()
        return offset + rows, [json.dumps(record, default=str, ensure_ascii=False) for record in records]

    return locate


def _parquet_files(path: Location) -> list[Location]:
    """The file itself, or every Parquet file under a directory (hidden ones, such as Spark's, skipped)."""
    if path.is_file():
        return [path]
    found = [
        found for relative, found in path.files_under() if relative.suffix.lower() in PARQUET_SUFFIXES
        and not any(part.startswith((".", "_")) for part in relative.parts)
    ]
    if not found:
        raise IngestError(f"{path} is a directory with no Parquet files (*.parquet, *.pq, *.parq) in it")
    return found


def _read_parquet(path: Location, converter: Converter) -> tuple[list[pa.Table], dict]:
    """A Parquet file or directory of them; a row's index (its quarantine `line`) counts across the files."""
    tables: list[pa.Table] = []
    offset = row_groups = 0
    parts = _parquet_files(path)
    for part in parts:
        with part.open_native() as handle:
            try:
                parquet = pq.ParquetFile(handle)
            except (pa.ArrowInvalid, OSError) as err:
                raise IngestError(f"{part} is not a readable Parquet file: {arrow_reason(err)}") from None
            _check_mapped_columns(part, converter.columns, parquet.schema_arrow.names)
            wanted = mapped_columns(converter.columns)
            start = offset
            try:
                for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
                    rows_table = pa.Table.from_batches([batch])
                    columns = {name: rows_table[name] for name in wanted}
                    tables.append(converter.convert(columns, _parquet_locator(rows_table, offset)))
                    offset += batch.num_rows
            except (pa.ArrowInvalid, OSError) as err:
                raise IngestError(f"{part}: cannot read Parquet rows after row {offset - start}: {arrow_reason(err)}") from None
            row_groups += parquet.num_row_groups
    counts = {"data_lines": offset, "blank_lines": 0, "row_groups": row_groups}
    return tables, counts | ({"parquet_files": len(parts)} if path.is_dir() else {})


def read_file(cfg: FileConfig) -> ReadResult:
    """Read interactions from a CSV (.csv.gz), RecBole .inter or Parquet file, or a directory of
    Parquet files, columns mapped by `cfg.columns`.

    Without a header, columns are named by 0-based position ("0", "1", ...).
    Without a timestamp column (`columns.timestamp` null), the row order is the time
    (`convert.ROW_ORDER_EPOCH`). Ratings: the `rating` column if mapped; else the `event_weights` weight of
    the `event` column; else 1.0 (implicit feedback). With `event_weights`, an
    event missing from them is quarantined ("unknown_event").
    """
    started = time.perf_counter()
    if cfg.path is None:
        raise IngestError("ingest.file.path is not set: point it at a CSV or Parquet file (or directory) of interactions")
    path = Location.of(cfg.path)
    if not path.is_file() and not path.is_dir():
        raise IngestError(f"interactions file not found: {path}")
    if path.is_file() and path.size == 0:
        raise IngestError(f"{path} is empty (0 bytes)")
    if cfg.event_weights is not None and cfg.columns.event is None:
        raise IngestError("ingest.file.event_weights is set but ingest.file.columns.event is not: map the event column")
    file_format = _file_format(path, cfg.format)

    quarantine = Quarantine()
    converter = Converter(
        cfg.columns, id_type=cfg.id_type, timestamp_unit=cfg.timestamp_unit, event_weights=cfg.event_weights,
        source=f"file:{path.name}", quarantine=quarantine,
    )
    logger.info("reading %s as %s", path, file_format)
    if file_format == "parquet":
        tables, counts = _read_parquet(path, converter)
        empty_message = f"{path} is empty: it holds no rows"
    else:
        tables, counts = _read_csv(path, cfg, file_format, converter, quarantine)
        only = "it holds only the header line" if cfg.header or file_format == "inter" else "it holds no data lines"
        empty_message = f"{path} is empty: {only}"
    details = {"format": file_format, "path": str(path), "id_type": cfg.id_type, **counts}
    return finish(tables, quarantine, converter, details, started=started, empty_message=empty_message)
