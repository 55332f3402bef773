"""The gate compares like with like, promotion can be switched off, and noise never picks the candidate."""

from __future__ import annotations

import pytest

from pipeline.core.config import PolicyConfig, RegistryConfig
from pipeline.registry.promote import comparability, promote
from pipeline.registry.register import select_candidate
from pipeline.registry.store import load_champion
from tests.registry_helpers import aliases, build_trained, copy_of_teacher, register_only, sqlite_tracking


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    """A smoke run: the same ID ranges, drawn again (another seed), so the same user IDs name other histories."""
    return build_trained(tmp_path_factory.mktemp("smoke"), {"seed": 7})


def test_a_run_on_other_data_cannot_replace_the_champion(work, other_data, tmp_path):
    tracking = sqlite_tracking(tmp_path)
    register_only(work, tracking, "main")
    assert promote(RegistryConfig(), tracking, work)["decision"] == "promoted"
    register_only(other_data, tracking, "main")
    smoke = promote(RegistryConfig(), tracking, other_data)
    assert smoke["decision"] == "refused" and not smoke["promoted"]
    assert "cannot be judged on this run's test split" in smoke["reasons"][0]
    assert "under registry.min_history_agreement 90%" in smoke["reasons"][1]
    assert smoke["comparability"]["history_agreement"] < 0.5 and smoke["comparability"]["users_known"] > 0
    assert "challenger" not in smoke  # refused before anything was scored
    assert aliases(tracking)["champion"] == "1"
    # The check is what makes the difference: without it the smoke run is gated on its own split.
    unchecked = promote(RegistryConfig(min_history_agreement=0.0, min_target_coverage=0.0), tracking, other_data)
    assert unchecked["decision"] in ("promoted", "rejected") and "challenger" in unchecked


def test_the_same_data_is_comparable(work):
    import pandas as pd
    import pyarrow.parquet as pq

    from pipeline.models.recommender import Recommender
    from pipeline.serving.pyfunc import Servable, build_serving_data

    data_dir = build_serving_data(work.features_dir, work.root / "serving")
    servable = Servable(Recommender.load(work.model_dir("main")), pd.read_parquet(data_dir / "items.parquet"),
                        pq.read_table(data_dir / "users.parquet"))
    comparable, figures, reasons = comparability(servable, work.features_dir, RegistryConfig())
    assert comparable and not reasons
    assert figures["history_agreement"] == 1.0 and figures["target_coverage"] == 1.0
    assert figures["users_known"] == figures["test_users"] > 0


def test_allow_promotion_false_gates_but_never_moves_the_champion(work, tmp_path):
    tracking = sqlite_tracking(tmp_path)
    register_only(work, tracking, "main")
    held = promote(RegistryConfig(allow_promotion=False), tracking, work)
    assert held["decision"] == "not_allowed" and not held["promoted"]
    assert "registry.allow_promotion is false" in held["reasons"][-1]
    assert "champion" not in aliases(tracking)
    assert promote(RegistryConfig(), tracking, work)["decision"] == "promoted"
    register_only(work, tracking, copy_of_teacher(work, "copy", 0.1))
    assert promote(RegistryConfig(allow_promotion=False), tracking, work)["decision"] == "not_allowed"
    assert aliases(tracking)["champion"] == "1"
    assert load_champion(RegistryConfig(), tracking, work.root)[1] == "1"


def _report(**models):
    return {"models": {name: {"ndcg@10": n, "hr@10": n, "latency_p50_ms": lat, "size_bytes": size}
                       for name, (n, lat, size) in models.items()}}


def test_noise_in_the_metric_never_picks_a_slower_model():
    # The case: bf16 0.05% above the teacher, smaller but slower (no speed-up rule to stop it).
    report = _report(teacher=(0.3000, 5.0, 1000), bf16=(0.3001, 8.0, 500))
    best, reasons = select_candidate(report, PolicyConfig(min_latency_speedup=None))
    assert best == "teacher" and "slower or larger than teacher" in reasons["bf16"]
    # Within the tolerance the fastest wins, then the smaller; outside it quality decides.
    report = _report(teacher=(0.300, 5.0, 1000), int8=(0.298, 2.0, 300), pq=(0.299, 2.0, 100), tiny=(0.25, 0.5, 10))
    assert select_candidate(report, PolicyConfig(min_latency_speedup=None))[0] == "pq"
    assert select_candidate(report, PolicyConfig(min_latency_speedup=None, tolerance=0.0))[0] == "teacher"
    assert select_candidate(report, PolicyConfig(min_latency_speedup=None, tolerance=0.2))[0] == "tiny"
