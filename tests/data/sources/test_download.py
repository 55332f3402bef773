"""pipeline.data.sources.download: MovieLens archives from a local HTTP server, checksums, atomic extraction."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.core.errors import IngestError
from pipeline.data.sources import download, movielens
from tests.data.sources.helpers import U_DATA, ml_config, write


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


@contextlib.contextmanager
def serve(directory: Path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/datasets/movielens"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def publish_ml_100k(site: Path, *, published_md5: str | None = None) -> str:
    """A tiny ml-100k.zip (top folder ml-100k/, like the real one) and its .md5 beside it."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.writestr("ml-100k/u.data", U_DATA)
        bundle.writestr("ml-100k/README", "tiny test copy\n")
    archive = buffer.getvalue()
    folder = site / "datasets" / "movielens"
    write(folder / "ml-100k.zip", archive)
    real_md5 = hashlib.md5(archive).hexdigest()
    # The BSD format GroupLens publishes: "MD5 (ml-100k.zip) = <hash>".
    write(folder / "ml-100k.zip.md5", f"MD5 (ml-100k.zip) = {published_md5 or real_md5}\n")
    return real_md5


@pytest.fixture
def no_proxy(monkeypatch):
    # A proxy from the environment must not intercept the local test server.
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.timeout(30)
def test_download_verifies_checksum_and_extracts_atomically(tmp_path, no_proxy):
    publish_ml_100k(tmp_path / "site")
    target = tmp_path / "data" / "ml-100k"

    with serve(tmp_path / "site") as base_url:
        result = movielens.read_movielens(ml_config(target, download=True, base_url=base_url))

    assert sorted(p.name for p in target.iterdir()) == ["README", "u.data"]
    assert (target / "u.data").read_text() == U_DATA
    assert [p.name for p in target.parent.iterdir()] == ["ml-100k"]  # no staging left behind
    assert result.table["user_id"].to_pylist() == [196, 186, 22]


@pytest.mark.timeout(30)
def test_download_with_bad_checksum_leaves_nothing(tmp_path, no_proxy):
    publish_ml_100k(tmp_path / "site", published_md5="0" * 32)
    target = tmp_path / "data" / "ml-100k"

    with serve(tmp_path / "site") as base_url, pytest.raises(IngestError, match="checksum mismatch"):
        download.download_movielens("ml-100k", target, base_url, timeout_s=10)

    assert not target.exists()
    assert list(target.parent.iterdir()) == []


@pytest.mark.timeout(30)
def test_download_of_unpublished_variant_is_a_clear_error(tmp_path, no_proxy):
    publish_ml_100k(tmp_path / "site")

    with serve(tmp_path / "site") as base_url, pytest.raises(IngestError, match=r"cannot download .*ml-1m\.zip\.md5"):
        download.download_movielens("ml-1m", tmp_path / "data" / "ml-1m", base_url, timeout_s=10)


def test_present_data_is_not_downloaded_again(tmp_path):
    ratings = write(tmp_path / "ml-100k" / "u.data", U_DATA)

    # An unreachable base_url proves no request is made.
    result = movielens.read_movielens(ml_config(ratings.parent, download=True, base_url="http://127.0.0.1:9"))

    assert result.table.num_rows == 3
