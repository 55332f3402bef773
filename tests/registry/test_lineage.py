"""The champion's lineage from its registry tags (pipeline/registry/lineage.py): where an incremental run starts."""

import json

import pytest
import yaml

from pipeline.core.config import RegistryConfig, TrackingConfig
from pipeline.core.errors import ConfigError, RegistryError
from pipeline.orchestration import runs
from pipeline.registry.lineage import champion_lineage
from pipeline.registry.promote import promote
from pipeline.registry.register import register
from tests.registry_helpers import build_trained, compress


def test_champion_lineage_from_the_registry_tags(tmp_path, monkeypatch):
    """An incremental run starts from the champion's work dir: its data, vocabularies and teacher."""
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert champion_lineage(RegistryConfig(), tracking, tmp_path) is None
    base = tmp_path / "params.yaml"
    base.write_text(yaml.safe_dump({"tracking": {"tracking_uri": tracking.tracking_uri}}))
    monkeypatch.setenv("LEANREC_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RegistryError, match="has no champion: an incremental run fine-tunes the champion"):
        runs.prepare_incremental_run("scheduled__1", {}, base_params=base)

    layout = build_trained(tmp_path / "trained")
    compress(layout, ("int8_table",))
    register(RegistryConfig(), tracking, layout)
    promote(RegistryConfig(), tracking, layout)
    lineage = champion_lineage(RegistryConfig(), tracking, tmp_path)
    root = layout.root.resolve()
    assert (lineage.version, lineage.workdir) == ("1", str(root))
    assert lineage.reference == str(root / "data/validated/interactions.parquet")
    assert lineage.features_dir == str(root / "data/features")
    config = json.loads((root / "models/main/model_config.json").read_text())
    assert lineage.model_dir == str(root / "models/main")  # the teacher, whichever variant was registered
    assert lineage.shape == {k: config[k] for k in ("d_model", "n_layers", "n_heads", "max_len")}

    run_root = runs.prepare_incremental_run("scheduled__2", {"epochs": 1}, base_params=base)
    params = runs.run_params(run_root)
    assert (params.drift.reference, params.features.vocab_from, params.train.init_from) == (
        lineage.reference, lineage.features_dir, lineage.model_dir)
    assert (params.train.d_model, params.train.epochs) == (config["d_model"], 1)

    # A work dir overwritten since registration is refused, not silently used.
    (layout.features_dir / "stats.json").write_text("{}")
    with pytest.raises(ConfigError, match="changed since registration"):
        champion_lineage(RegistryConfig(), tracking, tmp_path)
    # The run recorded its lineage: a retried prepare keeps the champion it started from.
    assert runs.prepare_incremental_run("scheduled__2", {"epochs": 1}, base_params=base) == run_root
