"""MovieLens archives from GroupLens: downloaded, checked against their published MD5, unpacked atomically."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from pipeline.core.errors import IngestError

logger = logging.getLogger(__name__)

DOWNLOAD_BLOCK_BYTES = 2**20
# The archives GroupLens publishes as {base_url}/{variant}.zip. `movielens` maps each
# ratings-file format to these names, and its tests check the two lists agree.
MOVIELENS_VARIANTS = ("ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "ml-32m")


def _open_url(url: str, timeout_s: float):
    try:
        return urllib.request.urlopen(url, timeout=timeout_s)  # noqa: S310 (the URL comes from params.yaml)
    except (urllib.error.URLError, OSError) as err:
        raise IngestError(f"cannot download {url}: {getattr(err, 'reason', err)}") from None


def _fetch_md5(url: str, timeout_s: float) -> str:
    """The checksum file beside the archive: `md5sum` ("<hash>  name") or BSD ("MD5 (name) = <hash>") style."""
    with _open_url(url, timeout_s) as response:
        text = response.read(64 * 1024).decode("ascii", errors="replace")
    match = re.search(r"\b[0-9a-fA-F]{32}\b", text)
    if match is None:
        # Never quote what was read: base_url may point at any file (file:///...).
        raise IngestError(f"{url} holds no MD5 checksum (32 hex digits) in its first {len(text)} characters")
    return match.group(0).lower()


def _download(url: str, target: Path, timeout_s: float) -> str:
    """Stream `url` into `target`; returns the MD5 of what was written."""
    digest = hashlib.md5(usedforsecurity=False)
    with _open_url(url, timeout_s) as response, open(target, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=target.name, leave=False, disable=None) as progress:
            try:
                while block := response.read(DOWNLOAD_BLOCK_BYTES):
                    digest.update(block)
                    out.write(block)
                    progress.update(len(block))
            except OSError as err:
                raise IngestError(f"download of {url} broke off: {err}") from None
    return digest.hexdigest()


def _extract_zip(archive: Path, target: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as bundle:
            for name in bundle.namelist():
                if name.startswith(("/", "\\")) or ".." in Path(name).parts:
                    shown = repr(name[:40]) + ("..." if len(name) > 40 else "")
                    raise IngestError(f"{archive.name} holds an unsafe path {shown}; not extracting it")
            bundle.extractall(target)
    except zipfile.BadZipFile as err:
        raise IngestError(f"{archive.name} is not a valid zip archive: {err}") from None


def download_movielens(variant: str, dest_dir: Path, base_url: str, *, timeout_s: float = 60.0) -> Path:
    """Fetch `{base_url}/{variant}.zip`, check it against `{variant}.zip.md5`, unpack it as `dest_dir`.

    Atomic: the archive is downloaded and extracted in a staging directory
    beside `dest_dir` and renamed onto it only once verified and complete, so a
    checksum mismatch or an interrupted download leaves nothing behind. The
    archive's single top folder (ml-100k/) becomes `dest_dir` itself.
    """
    dest_dir = Path(dest_dir)
    if variant not in MOVIELENS_VARIANTS:
        raise IngestError(f"unknown MovieLens variant {variant!r}; expected one of {list(MOVIELENS_VARIANTS)}")
    if dest_dir.exists() and (not dest_dir.is_dir() or any(dest_dir.iterdir())):
        raise IngestError(f"cannot download {variant} into {dest_dir}: it exists and is not an empty directory")
    url = f"{base_url.rstrip('/')}/{variant}.zip"
    expected_md5 = _fetch_md5(f"{url}.md5", timeout_s)
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s -> %s", url, dest_dir)
    with tempfile.TemporaryDirectory(prefix=f".{dest_dir.name}.download-", dir=dest_dir.parent) as staging_name:
        staging = Path(staging_name)
        archive = staging / f"{variant}.zip"
        actual_md5 = _download(url, archive, timeout_s)
        if actual_md5 != expected_md5:
            raise IngestError(
                f"checksum mismatch for {url}: expected MD5 {expected_md5} (from {url}.md5), got {actual_md5}; "
                "the download was discarded"
            )
        extracted = staging / "extracted"
        _extract_zip(archive, extracted)
        entries = list(extracted.iterdir())
        content = entries[0] if len(entries) == 1 and entries[0].is_dir() else extracted
        if dest_dir.exists():
            dest_dir.rmdir()  # empty, checked above; rename needs the name free
        os.replace(content, dest_dir)
    logger.info("MovieLens %s ready in %s (md5 %s verified)", variant, dest_dir, actual_md5)
    return dest_dir
