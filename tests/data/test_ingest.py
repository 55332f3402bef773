import json

import pandas as pd
import pyarrow.parquet as pq

from pipeline.core import schema
from pipeline.data.ingest import run_ingest
from pipeline.orchestration.cli import main
from tests.helpers import TINY


def test_synthetic_ingest_writes_raw_schema_and_report(tiny_params, layout):
    result = run_ingest(tiny_params.ingest, layout, seed=tiny_params.seed)
    table = pq.read_table(layout.raw_interactions)
    assert table.num_rows == TINY["ingest"]["synthetic"]["n_interactions"] == result.rows_written == result.rows_read
    assert table.schema.names == list(schema.RAW_COLUMNS)
    assert str(table.schema.field(schema.TIMESTAMP).type) == "timestamp[us, tz=UTC]"
    report = json.loads((layout.reports_dir / "ingest.json").read_text())
    assert report["rows_read"] == report["rows_written"] + report["rows_quarantined"]
    assert report["details"]["seed"] == tiny_params.seed
    assert pd.read_parquet(result.quarantine_path).empty


def test_ingest_is_idempotent(tiny_params, layout):
    run_ingest(tiny_params.ingest, layout, seed=1)
    first = pq.read_table(layout.raw_interactions)
    run_ingest(tiny_params.ingest, layout, seed=1)
    assert pq.read_table(layout.raw_interactions).equals(first)
    # No temporary files are left beside the outputs.
    assert [p.name for p in layout.raw_interactions.parent.iterdir()] == ["interactions.parquet"]


def test_cli_runs_ingest_with_override(tmp_path, capsys):
    code = main(["ingest", "--workdir", str(tmp_path), "-S", "ingest.synthetic.n_interactions=3000"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["rows_written"] == 3000
    assert pq.read_metadata(tmp_path / "data/raw/interactions.parquet").num_rows == 3000
