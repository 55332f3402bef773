"""benchmarks/catalogue_training.py end to end on a tiny catalogue: the train stage's run, both models tested, the report written."""

from __future__ import annotations

import json

import pytest

from benchmarks.catalogue_training import main


@pytest.mark.slow  # the data stages and two epochs: about 10 s
def test_a_tiny_catalogue_trains_and_tests_against_popularity(tmp_path):
    main(["--items", "3000", "--interactions", "30000", "--max-epochs", "2", "--patience", "1",
          "--validation-users", "200", "--test-users", "300", "--negatives", "64",
          "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    (report_path,) = (tmp_path / "out").glob("train-catalogue-*.json")
    report = json.loads(report_path.read_text())
    assert report_path.name == f"train-catalogue-{report['catalogue']['items']}.json"
    assert 0 < report["catalogue"]["items"] <= 3000
    assert report["catalogue"]["test_users_sampled"] == 300
    assert 1 <= report["epochs_run"] == len(report["history"]) <= 2
    assert "train.sparse_item_updates=true" in report["overrides"] and "train.loss=sampled_softmax" in report["overrides"]
    assert set(report["test"]) == {"sasrec", "popularity"}
    for figures in report["test"].values():
        assert 0.0 <= figures["ndcg@10"] <= figures["hr@10"] <= 1.0
    # The best validation epoch is the one kept, and the table names epochs from one.
    assert report["best_valid_ndcg10"] == max(r["valid_ndcg10"] for r in report["history"])
    table = report_path.with_suffix(".md").read_text()
    assert f"best epoch {report['best_epoch'] + 1} of {report['epochs_run']}" in table
