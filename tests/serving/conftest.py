"""The served model of the tests under tests/serving: a trained teacher and a variant, logged as pyfuncs."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

import mlflow
from pipeline.data.sequences import load_sequences
from pipeline.models.variants import save_variant
from pipeline.serving.pyfunc import log_servable
from tests.helpers import mlflow_uris_kept
from tests.registry_helpers import build_trained


@pytest.fixture(scope="package")
def served(tmp_path_factory):
    """A trained teacher and its int8_table variant, logged as pyfuncs to a SQLite store and loaded back (once for tests/serving)."""
    root = tmp_path_factory.mktemp("serving")
    layout = build_trained(root)
    from pipeline.models.sasrec import load_model

    variant_dir = save_variant(load_model(layout.model_dir("main")), layout.model_dir("main") / "variants" / "int8_table", "int8_table")
    with mlflow_uris_kept():  # this package's store must not become every later test's
        mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
        # Artifacts beside the store: a SQLite store's default artifact root is ./mlruns in the current directory.
        experiment = mlflow.create_experiment("serving", artifact_location=(root / "mlartifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            teacher_info = log_servable(layout.model_dir("main"), layout.features_dir, name="teacher")
            variant_info = log_servable(variant_dir, layout.features_dir, name="variant")
        data = load_sequences(layout.features_dir)
        items = pq.read_table(layout.features_dir / "item_vocab.parquet").to_pandas()
        users = pq.read_table(layout.features_dir / "user_vocab.parquet").to_pandas()
        yield {
            "layout": layout, "data": data, "teacher": mlflow.pyfunc.load_model(teacher_info.model_uri),
            "variant": mlflow.pyfunc.load_model(variant_info.model_uri), "teacher_info": teacher_info,
            "item_id": dict(zip(items["index"], items["id"], strict=True)),
            "item_index": dict(zip(items["id"], items["index"], strict=True)),
            "user_id": dict(zip(users["index"], users["id"], strict=True)), "variant_dir": variant_dir,
            "tracking_uri": f"sqlite:///{root}/mlflow.db",
        }
