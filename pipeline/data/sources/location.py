"""Where a source file is: a local path or an object-store URI, read through pyarrow's filesystems.

`ingest.file.path` may be a URI such as `s3://bucket/logs/` (or gs://, hdfs://, abfs://: whatever
`pyarrow.fs.FileSystem.from_uri` opens). Credentials and the endpoint come from the store's usual
settings: for S3, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a profile), AWS_DEFAULT_REGION and
AWS_ENDPOINT_URL for an S3-compatible server such as MinIO (or `?endpoint_override=host:9000&scheme=http`
in the URI). The object is read as a local file is, in the same batches and chunks (bounded memory):
Parquet through Arrow's native reader, CSV through a buffered stream, neither copied to disk first.
Every engine reads its input this way, since ingest is the one stage that reads the source.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.core.errors import IngestError
from pipeline.core.io import is_uri

READ_BUFFER_BYTES = 1 << 20


@dataclass(frozen=True)
class Location:
    """A file or directory in `filesystem` at `path`; `shown` is how the configuration named it (for messages)."""

    filesystem: pafs.FileSystem
    path: str
    shown: str

    @classmethod
    def of(cls, path: str | Path) -> Location:
        text = str(path)
        if not is_uri(text):
            return cls(pafs.LocalFileSystem(), str(Path(text).absolute()), text)
        try:
            filesystem, inner = pafs.FileSystem.from_uri(text)
        except (pa.ArrowException, OSError, ValueError) as err:
            raise IngestError(f"{text}: cannot open this URI: {_reason(err)}") from None
        return cls(filesystem, inner, text)

    def __str__(self) -> str:
        return self.shown

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def suffixes(self) -> list[str]:
        return PurePosixPath(self.path).suffixes

    @cached_property
    def _info(self) -> pafs.FileInfo:  # one request to the store, not one per question
        try:
            return self.filesystem.get_file_info(self.path)
        except (pa.ArrowException, OSError) as err:  # no such bucket, no credentials, store unreachable
            raise IngestError(f"{self.shown}: cannot be read: {_reason(err)}") from None

    def is_file(self) -> bool:
        return self._info.type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info.type == pafs.FileType.Directory

    @property
    def size(self) -> int:
        return self._info.size

    def open(self) -> BinaryIO:
        """The bytes, buffered (readline, seek), for the CSV reader; closing it closes the file."""
        return io.BufferedReader(self.open_native(), READ_BUFFER_BYTES)  # type: ignore[arg-type]

    def open_native(self) -> pa.NativeFile:
        """Arrow's own random-access file, for the Parquet reader."""
        try:
            return self.filesystem.open_input_file(self.path)
        except (pa.ArrowException, OSError) as err:
            raise IngestError(f"{self.shown}: cannot be opened: {_reason(err)}") from None

    def files_under(self) -> list[tuple[PurePosixPath, Location]]:
        """Every file below this directory (recursively), with its path relative to it, in sorted order."""
        try:
            infos = self.filesystem.get_file_info(pafs.FileSelector(self.path, recursive=True))
        except (pa.ArrowException, OSError) as err:
            raise IngestError(f"{self.shown}: cannot list it: {_reason(err)}") from None
        found = []
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            relative = PurePosixPath(info.path).relative_to(PurePosixPath(self.path))
            found.append((relative, Location(self.filesystem, info.path, f"{self.shown.rstrip('/')}/{relative}")))
        return sorted(found, key=lambda item: item[0])


def _reason(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
