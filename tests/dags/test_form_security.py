"""What a person triggering a DAG run may change: the form's free `overrides` take only the keys of
runs.FORM_OVERRIDE_PREFIXES (never a path, the tracking server, the registered model), while the
CLI keeps every key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.core.config import load_params
from pipeline.core.errors import ConfigError
from pipeline.orchestration import airflow as orchestration
from pipeline.orchestration import runs
from tests.helpers import TINY_FORM

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("override, key", [
    ("tracking.tracking_uri=http://attacker.example:5000", "tracking.tracking_uri"),
    ("tracking.experiment=elsewhere", "tracking.experiment"),
    ("tracking={tracking_uri: 'http://x'}", "tracking"),
    ("ingest.movielens.path=/etc", "ingest.movielens.path"),
    ("ingest.file.path=/root/.ssh/id_rsa", "ingest.file.path"),
    ("ingest.movielens.download=true", "ingest.movielens.download"),
    ("ingest.movielens.base_url=http://attacker.example", "ingest.movielens.base_url"),
    ("ingest.file={path: /etc/passwd}", "ingest.file"),
    ("features.vocab_from=/tmp/other", "features.vocab_from"),
    ("train.init_from=/tmp/evil-checkpoint", "train.init_from"),
    ("train={init_from: /tmp/evil-checkpoint}", "train"),  # a section holding a path key
    ("train.run_name=../../../tmp/x", "train.run_name"),
    ("drift.reference=/tmp/x.parquet", "drift.reference"),
    ("registry.model_name=someone-elses-model", "registry.model_name"),
    ("registry={model_name: other}", "registry"),
    (" tracking.tracking_uri =http://x", "tracking.tracking_uri"),  # spaces the parser strips
])
def test_form_overrides_refuse_keys_outside_the_allowlist(override, key, tmp_path, monkeypatch):
    monkeypatch.setenv("LEANREC_RUNS_DIR", str(tmp_path / "runs"))
    with pytest.raises(ConfigError) as refused:
        runs.prepare_run("manual__1", {"overrides": ["train.lr=0.001", override]}, base_params=ROOT / "params.yaml")
    message = str(refused.value)
    assert f"override {key!r} is not allowed from the Airflow form" in message
    assert "Allowed: " + ", ".join(runs.FORM_OVERRIDE_PREFIXES) in message  # the allowed keys, named
    assert "-S" in message  # where the other keys can be set
    assert not (tmp_path / "runs").exists()  # refused before the run root exists


def test_form_overrides_take_the_allowed_keys():
    allowed = ["seed=7", "train.lr=0.001", "train.bpr.epochs=2", "train.curriculum={enabled: true, start_len: 5, epochs: 2}",
               "compress.pq.n_subspaces=16", "evaluate.ks=[10]", "drift.action=warn", "validate.min_rows=10",
               "features.split.strategy=temporal", "registry.policy.max_size_bytes=1000000", "registry.ndcg_tolerance=0.02",
               "recommend.k=5", "tracking.enabled=false", "ingest.synthetic.n_topics=3", "ingest.file.columns={user: u}"]
    assert all(runs.form_override_allowed(item.split("=", 1)[0]) for item in allowed)
    params, overrides = runs.effective_params({"overrides": [item for item in allowed if "columns" not in item]})
    assert params.seed == 7 and params.train.bpr.epochs == 2 and params.compress.pq.n_subspaces == 16
    assert params.drift.action == "warn" and params.tracking.enabled is False and params.train.curriculum.start_len == 5
    # The suite's own tiny form passes as it is.
    assert runs.overrides_from_form(TINY_FORM)[-len(TINY_FORM["overrides"]):] == TINY_FORM["overrides"]


def test_prefixes_match_whole_key_segments():
    assert runs.form_override_allowed("seed")
    assert not runs.form_override_allowed("seedling")
    assert runs.form_override_allowed("recommend.k") and not runs.form_override_allowed("recommend.kk")
    assert not runs.form_override_allowed("train.init_from.x")
    # Every refused key lies under an allowed prefix or is simply not listed: neither is settable.
    assert not any(runs.form_override_allowed(key) for key in runs.FORM_OVERRIDE_REFUSED)


def test_the_pipeline_itself_still_sets_any_key():
    # An incremental run's lineage (the champion's paths) comes before the form, not through it ...
    params, _ = runs.effective_params({"overrides": ["train.lr=0.001"]},
                                      base_overrides=['train.init_from="/tmp/champion/models/main"'])
    assert params.train.init_from == "/tmp/champion/models/main"
    # ... and the CLI's -S (load_params' overrides) takes every key, paths and tracking server included.
    cli = load_params(ROOT / "params.yaml", ["tracking.tracking_uri=http://127.0.0.1:5000", "ingest.file.path=/data/x.csv"])
    assert cli.tracking.tracking_uri == "http://127.0.0.1:5000" and cli.ingest.file.path == "/data/x.csv"


def test_the_form_field_states_the_allowed_keys():
    description = orchestration.overrides_field("train.lr=0.001").description
    assert ", ".join(runs.FORM_OVERRIDE_PREFIXES) in description
    assert ", ".join(runs.FORM_OVERRIDE_REFUSED) in description
    assert re.search(r"tracking server", description)
