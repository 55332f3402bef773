"""Drift checks of new interactions against reference data (pipeline/data/drift.py)."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import DriftConfig, params_from_dict
from pipeline.core.errors import DriftDetected, IngestError
from pipeline.core.io import Layout, write_parquet
from pipeline.data.drift import drift_checks, popularity_buckets, psi, run_drift


def _frame(users, items) -> pd.DataFrame:
    return pd.DataFrame({"user_id": users, "item_id": items})


def _zipf(n: int, n_items: int, seed: int, first_user: int = 0, offset: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_items + 1)
    items = rng.choice(n_items, size=n, p=weights / weights.sum()) + offset
    return _frame(rng.integers(first_user, first_user + n // 10, size=n), items)


def test_a_sample_of_the_same_distribution_passes():
    result = drift_checks(_zipf(20_000, 200, seed=1), _zipf(5_000, 200, seed=2), DriftConfig())
    assert result.success
    assert result.metrics["new_user_share"] == 0.0
    assert result.metrics["popularity_psi"] < 0.05
    assert result.metrics["popularity_tv"] < 0.15


def test_metrics_by_hand():
    reference = _frame([1, 1, 2, 3], ["a", "a", "b", "c"])
    batch = _frame([1, 4, 4, 5], ["a", "b", "b", "d"])
    result = drift_checks(reference, batch, DriftConfig(psi_buckets=2))
    assert result.metrics["new_user_share"] == pytest.approx(2 / 3)  # users 4, 5 of 1, 4, 5
    assert result.metrics["new_item_share"] == pytest.approx(1 / 3)  # d of a, b, d
    assert result.metrics["new_item_interaction_share"] == pytest.approx(0.25)
    # p = a .5, b .25, c .25; q = a .25, b .5, d .25
    assert result.metrics["popularity_tv"] == pytest.approx(0.5)
    # Buckets of equal reference mass: {a} and {b, c}, p = (.5, .5); the batch's known-item
    # interactions a, b, b give q = (1/3, 2/3); the new item d is left out of PSI.
    expected = (1 / 3 - 0.5) * math.log((1 / 3) / 0.5) + (2 / 3 - 0.5) * math.log((2 / 3) / 0.5)
    assert result.metrics["popularity_psi"] == pytest.approx(expected)
    assert result.counts == {"reference_interactions": 4, "batch_interactions": 4, "batch_users": 3, "new_users": 2,
                             "batch_items": 3, "new_items": 1}


def test_popularity_buckets_hold_equal_reference_mass():
    counts = pd.Series([40, 30, 20, 10], index=["a", "b", "c", "d"])
    assert popularity_buckets(counts, 2).to_dict() == {"a": 0, "b": 0, "c": 1, "d": 1}
    assert psi(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 0.0


def test_a_shift_to_the_tail_and_unknown_items_fails_the_right_checks():
    reference = _zipf(20_000, 200, seed=1)
    shifted = _zipf(5_000, 200, seed=2)
    shifted["item_id"] = 199 - shifted["item_id"] + 20  # popular items become the tail; 20 of 200 IDs are new
    result = drift_checks(reference, shifted, DriftConfig())
    failed = {c["check"] for c in result.checks if not c["success"]}
    assert not result.success
    assert failed == {"popularity_tv", "popularity_psi"}
    assert result.metrics["popularity_tv"] > 0.5 and result.metrics["popularity_psi"] > 1.0


def test_run_drift_writes_the_report_and_stops_on_failure(tmp_path):
    layout = Layout(tmp_path)
    reference = tmp_path / "reference.parquet"
    write_parquet(_zipf(2_000, 50, seed=1), reference)
    write_parquet(_zipf(1_000, 50, seed=2, first_user=10_000), layout.validated_interactions)  # only new users
    cfg = params_from_dict({"drift": {"max_new_user_share": 0.5}}).drift
    with pytest.raises(DriftDetected, match=r"new_user_share 1.0000 > 0.5"):
        run_drift(cfg, layout, reference)
    report = json.loads((layout.reports_dir / "drift.json").read_text())
    assert report["success"] is False and report["action"] == "fail"
    assert {c["check"]: c["success"] for c in report["checks"]}["new_user_share"] is False

    warned = run_drift(cfg.model_copy(update={"action": "warn"}), layout, reference)
    assert warned.success is False


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(IngestError, match="lack columns"):
        drift_checks(pd.DataFrame({"user_id": [1]}), _frame([1], [1]), DriftConfig())
    with pytest.raises(IngestError, match="batch interactions are empty"):
        drift_checks(_frame([1], [1]), _frame([], []), DriftConfig())
    with pytest.raises(IngestError, match="not found"):
        run_drift(DriftConfig(), Layout(tmp_path), tmp_path / "missing.parquet")


def test_cli_drift_stage(tmp_path, capsys):
    from pipeline.orchestration.cli import main

    layout = Layout(tmp_path)
    reference = tmp_path / "reference.parquet"
    write_parquet(_zipf(2_000, 50, seed=1), reference)
    write_parquet(_zipf(1_000, 50, seed=2), layout.validated_interactions)
    params = str(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("{}\n")
    assert main(["drift", "--params", params, "--workdir", str(tmp_path)]) == 2  # no reference configured
    assert main(["drift", "--params", params, "--workdir", str(tmp_path), "-S", f"drift.reference={reference}"]) == 0
    assert json.loads(capsys.readouterr().out)["success"] is True
    assert main(["drift", "--params", params, "--workdir", str(tmp_path), "-S", f"drift.reference={reference}",
                 "-S", "drift.max_popularity_tv=0.0"]) == DriftDetected.exit_code
