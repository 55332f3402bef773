"""pipeline.data.sources.location: `ingest.file.path` as an object-store URI (s3://), against moto's S3 server.

Each file is read once from local disk and once from the S3 server: the same table, the same
quarantine, the same row accounting; and each way an object-store path can be wrong is a clear error.
"""

from __future__ import annotations

import gzip

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.core.config import IngestConfig, params_from_dict
from pipeline.core.errors import IngestError
from pipeline.core.io import Layout, is_uri
from pipeline.data.features_outofcore import run_features_on
from pipeline.data.ingest import run_ingest
from pipeline.data.sources import files, text
from pipeline.data.sources.location import Location
from pipeline.data.validation import run_validate
from pipeline.orchestration import runs
from tests.data.sources.helpers import file_config, write
from tests.helpers import TINY

BUCKET = "leanrec-logs"
CSV = "user,item,ts\n1,10,100\n1,11,200\nx,12,300\n2,10,150\n2,y,160\n3,14,400\n"


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """An empty bucket; the AWS settings a user would export, pointing at the local server."""
    for key, value in {
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_server, "NO_PROXY": "127.0.0.1",
        "AWS_EC2_METADATA_DISABLED": "true",  # credentials come from the variables, never from an instance endpoint
    }.items():
        monkeypatch.setenv(key, value)
    filesystem = pafs.S3FileSystem(endpoint_override=s3_server, scheme="http", region="us-east-1",
                                   access_key="test", secret_key="test", allow_bucket_creation=True,
                                   allow_bucket_deletion=True)
    filesystem.create_dir(BUCKET)
    yield filesystem
    filesystem.delete_dir(BUCKET)


def _upload(filesystem, local, key: str) -> str:
    pafs.copy_files(str(local), f"{BUCKET}/{key}", destination_filesystem=filesystem)
    return f"s3://{BUCKET}/{key}"


def _csv_config(path, **overrides):
    return file_config(path, columns={"user": "user", "item": "item", "timestamp": "ts"}, id_type="int",
                       timestamp_unit="s", **overrides)


def _assert_same_read(local, remote) -> None:
    assert remote.table.equals(local.table)
    assert remote.quarantine.equals(local.quarantine)
    assert {key: value for key, value in remote.details.items() if key not in ("path", "seconds")} == \
        {key: value for key, value in local.details.items() if key not in ("path", "seconds")}


@pytest.mark.parametrize("name", ["log.csv", "log.csv.gz"])
def test_a_csv_in_s3_reads_as_the_same_file_on_disk(tmp_path, s3, monkeypatch, name):
    monkeypatch.setattr(text, "CHUNK_BYTES", 16)  # lines cut across reads, and a seek past the header
    content = CSV.encode()
    local = write(tmp_path / name, gzip.compress(content) if name.endswith(".gz") else content)

    on_disk = files.read_file(_csv_config(local))
    in_s3 = files.read_file(_csv_config(_upload(s3, local, f"raw/{name}")))

    _assert_same_read(on_disk, in_s3)
    assert len(in_s3.quarantine) == 2 and in_s3.table.num_rows == 4  # the bad rows are kept, not lost
    assert in_s3.details["path"] == f"s3://{BUCKET}/raw/{name}"


def test_a_directory_of_parquet_files_in_s3_reads_as_on_disk(tmp_path, s3):
    directory = tmp_path / "logs"
    directory.mkdir()
    for part, users in enumerate(([1, 1, 2], [2, 3])):
        table = pa.table({"user": users, "item": [10 + n for n in range(len(users))], "ts": [100 * (n + 1) for n in range(len(users))]})
        pq.write_table(table, directory / f"part-{part}.parquet")
    write(directory / "_SUCCESS", "")  # Spark's marker files are skipped, here as on disk
    write(directory / ".part-0.parquet.crc", "x")
    _upload(s3, directory, "logs")

    on_disk = files.read_file(_csv_config(directory))
    in_s3 = files.read_file(_csv_config(f"s3://{BUCKET}/logs/"))

    _assert_same_read(on_disk, in_s3)
    assert in_s3.details["parquet_files"] == 2 and in_s3.table.num_rows == 5


def test_the_ingest_stage_writes_the_same_raw_table_from_s3(tmp_path, s3):
    local = write(tmp_path / "log.csv", CSV)
    uri = _upload(s3, local, "log.csv")

    def ingest(path, root):
        cfg = IngestConfig(source="file", file=_csv_config(path))
        return run_ingest(cfg, Layout(root), seed=0)

    on_disk, in_s3 = ingest(local, tmp_path / "a"), ingest(uri, tmp_path / "b")

    assert pq.read_table(Layout(tmp_path / "b").raw_interactions).equals(pq.read_table(Layout(tmp_path / "a").raw_interactions))
    assert (in_s3.rows_written, in_s3.rows_quarantined) == (on_disk.rows_written, on_disk.rows_quarantined) == (4, 2)


def test_a_missing_object_or_bucket_is_named(s3):
    with pytest.raises(IngestError, match=rf"interactions file not found: s3://{BUCKET}/nothing\.csv"):
        files.read_file(_csv_config(f"s3://{BUCKET}/nothing.csv"))
    with pytest.raises(IngestError, match=r"interactions file not found: s3://no-such-bucket-here/log\.csv"):
        files.read_file(_csv_config("s3://no-such-bucket-here/log.csv"))


def test_an_empty_object_and_a_prefix_without_parquet_are_errors(tmp_path, s3):
    with pytest.raises(IngestError, match=r"log\.csv is empty \(0 bytes\)"):
        files.read_file(_csv_config(_upload(s3, write(tmp_path / "log.csv", ""), "empty/log.csv")))
    _upload(s3, write(tmp_path / "notes.txt", "x"), "other/notes.txt")
    with pytest.raises(IngestError, match=r"is a directory with no Parquet files"):
        files.read_file(_csv_config(f"s3://{BUCKET}/other"))


def test_an_unknown_scheme_is_a_clear_error():
    with pytest.raises(IngestError, match=r"nosuch://bucket/log\.csv: cannot open this URI"):
        Location.of("nosuch://bucket/log.csv")


def test_uris_are_told_from_local_paths():
    assert is_uri("s3://bucket/key") and is_uri("gs://b/k") and is_uri("file:///tmp/x.csv")
    assert not is_uri("data/log.csv") and not is_uri("/abs/log.csv") and not is_uri("C:/logs/x.csv")


def test_a_uri_from_the_airflow_form_is_not_made_relative_to_the_project(tmp_path):
    params, _ = runs.effective_params({"source": "file", "data_path": f"s3://{BUCKET}/logs/"})
    relative, _ = runs.effective_params({"source": "file", "data_path": "data/logs.csv"})

    assert params.ingest.file.path == f"s3://{BUCKET}/logs/"
    assert relative.ingest.file.path == str(runs.project_root() / "data" / "logs.csv")


def test_every_engine_runs_validate_and_features_on_an_s3_source_as_on_disk(tmp_path, s3, sql_engine):
    """Ingest is the one reader of the source, so duckdb and spark get an object-store source through it."""
    generated = Layout(tmp_path / "generated")
    run_ingest(params_from_dict(TINY).ingest, generated, seed=0)
    uri = _upload(s3, generated.raw_interactions, "exports/interactions.parquet")

    def run(path, engine: str) -> Layout:
        params = params_from_dict({**TINY, "data_engine": engine, "validate": {"min_rows": 100, "data_docs": False},
                                   "ingest": {"source": "file", "file": {"path": str(path), "columns": {"rating": "rating"}}}})
        layout = Layout(tmp_path / engine / ("s3" if is_uri(path) else "disk"))
        run_ingest(params.ingest, layout, seed=params.seed)
        run_validate(params.validate_, layout, engine=engine)
        run_features_on(engine, params.features, layout)
        return layout

    on_disk, from_s3 = run(generated.raw_interactions, "pandas"), run(uri, sql_engine)
    for name in ("interactions.parquet", "sequences.parquet", "user_vocab.parquet", "item_vocab.parquet"):
        assert pq.read_table(from_s3.features_dir / name).equals(pq.read_table(on_disk.features_dir / name)), name
