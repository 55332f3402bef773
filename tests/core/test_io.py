import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.io import parquet_stream

SCHEMA = pa.schema([("n", pa.int64())])


def _chunk(start: int, rows: int = 1000) -> pa.Table:
    return pa.table({"n": pa.array(range(start, start + rows), pa.int64())}, schema=SCHEMA)


def test_a_stream_written_in_the_background_holds_every_chunk_in_order(tmp_path):
    target = tmp_path / "out.parquet"
    with parquet_stream(target, SCHEMA) as writer:
        for start in range(0, 50_000, 1000):
            writer.write_table(_chunk(start))
        assert not target.exists()  # only once closed
    assert pq.read_table(target).column("n").to_pylist() == list(range(50_000))


def test_a_failed_background_write_is_raised_and_leaves_no_file(tmp_path):
    target = tmp_path / "out.parquet"
    wrong = pa.table({"other": pa.array([1.5])})  # not the stream's schema: the writer thread's write fails
    with pytest.raises(ValueError, match="schema"), parquet_stream(target, SCHEMA) as writer:
        writer.write_table(_chunk(0))
        writer.write_table(wrong)
        for start in range(1000, 20_000, 1000):  # raised here at the latest, or at the close
            writer.write_table(_chunk(start))
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_an_error_in_the_producer_leaves_no_file_and_is_the_error_raised(tmp_path):
    target = tmp_path / "out.parquet"
    with pytest.raises(RuntimeError, match="producer"), parquet_stream(target, SCHEMA) as writer:
        writer.write_table(_chunk(0))
        writer.write_table(pa.table({"other": pa.array([1.5])}))  # a failed write too: the producer's error wins
        raise RuntimeError("producer failed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
