"""The official MovieLens rating files -> the raw interactions table (`read_movielens`).

The format is detected from the file name or its first line: ML-100K `u.data`
(tab-separated), ML-1M/10M `ratings.dat` (`::`-separated), ML-20M/25M/32M
`ratings.csv` (comma, with a header). Optionally downloaded and
checksum-verified first (`download`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import ColumnMapping, MovieLensConfig
from pipeline.core.errors import IngestError
from pipeline.data.sources.convert import Converter, Quarantine, ReadResult, finish
from pipeline.data.sources.download import MOVIELENS_VARIANTS, download_movielens
from pipeline.data.sources.location import Location
from pipeline.data.sources.text import Delimited, bom_length, describe_line, peek_first_line, read_delimited

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _MovieLensFormat:
    file_name: str
    variants: tuple[str, ...]
    separator: str
    header: str | None
    description: str

    def matches(self, first_line: str) -> bool:
        if self.header is not None:
            return first_line.strip() == self.header
        # The field count is the signature; the values are not checked here, so a
        # bad first line is quarantined like any other line instead of failing the file.
        return len(first_line.split(self.separator)) == len(MOVIELENS_COLUMNS)


MOVIELENS_COLUMNS = ("user", "item", "rating", "timestamp")
MOVIELENS_FORMATS = (
    _MovieLensFormat(
        "u.data", ("ml-100k",), "\t", None,
        "ML-100K u.data: tab-separated 'user item rating timestamp', no header",
    ),
    _MovieLensFormat(
        "ratings.dat", ("ml-1m", "ml-10m"), "::", None,
        "ML-1M/10M ratings.dat: 'user::item::rating::timestamp', no header",
    ),
    _MovieLensFormat(
        "ratings.csv", ("ml-20m", "ml-25m", "ml-32m"), ",", "userId,movieId,rating,timestamp",
        "ML-20M/25M/32M ratings.csv: comma-separated with the header 'userId,movieId,rating,timestamp'",
    ),
)


def _find_ratings_files(directory: Path, formats: list[_MovieLensFormat]) -> list[Path]:
    """Rating files in `directory`, else in its subdirectories (archives unpack into e.g. ml-10M100K/)."""
    names = [fmt.file_name for fmt in formats]
    found = [directory / name for name in names if (directory / name).is_file()]
    if found:
        return found
    subdirectories = sorted(entry for entry in directory.iterdir() if entry.is_dir())
    return [sub / name for sub in subdirectories for name in names if (sub / name).is_file()]


def _locate_movielens(path: Path, variant: str) -> tuple[Path, _MovieLensFormat]:
    formats = [fmt for fmt in MOVIELENS_FORMATS if variant == "auto" or variant in fmt.variants]
    expected = "; ".join(fmt.description for fmt in formats)
    if path.is_dir():
        found = _find_ratings_files(path, formats)
        if not found:
            raise IngestError(
                f"no MovieLens ratings file in {path}: expected "
                f"{' or '.join(fmt.file_name for fmt in formats)} ({expected})"
            )
        if len(found) > 1:
            raise IngestError(f"several MovieLens ratings files under {path}: {[str(p) for p in found]}; "
                              "point ingest.movielens.path at one of them")
        ratings_path = found[0]
    elif path.is_file():
        ratings_path = path
    else:
        raise IngestError(
            f"MovieLens data not found at {path}: fix ingest.movielens.path, or set "
            "ingest.movielens.download: true to fetch it"
        )
    if ratings_path.stat().st_size == 0:
        raise IngestError(f"{ratings_path} is empty (0 bytes)")

    first_line, _ = peek_first_line(Location.of(ratings_path))
    named = [fmt for fmt in formats if fmt.file_name == ratings_path.name]
    for fmt in named or formats:
        if fmt.matches(first_line):
            return ratings_path, fmt
    if named:
        raise IngestError(
            f"{ratings_path} does not match the expected format ({named[0].description}): its first line is "
            f"{describe_line(first_line)}. Was it written with another separator?"
        )
    raise IngestError(
        f"{ratings_path} is not a MovieLens ratings file. Expected {expected}; its first line is "
        f"{describe_line(first_line)}"
    )


def _variant_label(variant: str, fmt: _MovieLensFormat, ratings_path: Path) -> str:
    if variant != "auto":
        return variant
    if len(fmt.variants) == 1:
        return fmt.variants[0]
    # ratings.dat is ML-1M or ML-10M: the archive folder tells (ml-1m/, ml-10M100K/).
    folder = ratings_path.parent.name.lower()
    return next((known for known in fmt.variants if folder.startswith(known)), "/".join(fmt.variants))


def _has_movielens_data(path: Path, variant: str) -> bool:
    if path.is_file():
        return True
    formats = [fmt for fmt in MOVIELENS_FORMATS if variant == "auto" or variant in fmt.variants]
    return path.is_dir() and bool(_find_ratings_files(path, formats))


def read_movielens(cfg: MovieLensConfig) -> ReadResult:
    """Read an official MovieLens ratings file (see the module docstring for the formats).

    `cfg.path` is the dataset directory or the ratings file itself. With
    `cfg.download`, a missing dataset is first fetched into `cfg.path`.
    """
    started = time.perf_counter()
    path = Path(cfg.path)
    if cfg.download and not _has_movielens_data(path, cfg.variant):
        download_movielens(_variant_to_download(cfg.variant, path), path, cfg.base_url)
    ratings_path, fmt = _locate_movielens(path, cfg.variant)
    variant = _variant_label(cfg.variant, fmt, ratings_path)

    quarantine = Quarantine()
    converter = Converter(
        ColumnMapping(user="user", item="item", timestamp="timestamp", rating="rating"),
        id_type="int", timestamp_unit="s", event_weights=None,
        source=f"movielens:{variant}", quarantine=quarantine,
    )
    ratings = Location.of(ratings_path)
    if fmt.header is not None:
        data_start, first_line = peek_first_line(ratings)[1], 2
    else:
        data_start, first_line = bom_length(ratings), 1
    layout = Delimited(MOVIELENS_COLUMNS, fmt.separator, quoted=False)
    logger.info("reading MovieLens %s (%s)", ratings_path, fmt.description)
    tables, counts = read_delimited(
        ratings, layout, data_start=data_start, first_line=first_line, converter=converter, quarantine=quarantine
    )
    details = {
        "format": fmt.file_name, "variant": variant, "path": str(ratings_path), "separator": fmt.separator, **counts,
    }
    only = "it holds only the header line" if fmt.header else "it holds no data lines"
    empty_message = f"{ratings_path} is empty: {only}"
    return finish(tables, quarantine, converter, details, started=started, empty_message=empty_message)


def _variant_to_download(variant: str, path: Path) -> str:
    if variant != "auto":
        return variant
    if path.name.lower() in MOVIELENS_VARIANTS:
        return path.name.lower()
    raise IngestError(
        f"ingest.movielens.download needs to know what to fetch into {path}: set ingest.movielens.variant "
        f"to one of {list(MOVIELENS_VARIANTS)}"
    )
