"""The registry in words: the registered model's and each version's descriptions, the gate's decision,
and the champion history from the CLI."""

from __future__ import annotations

import json
import shutil

import pytest

from mlflow import MlflowClient
from pipeline.core.config import RegistryConfig
from pipeline.orchestration.cli import main
from pipeline.registry.describe import LEGACY_MODEL_DESCRIPTION, gate_description, model_description
from pipeline.registry.promote import promote, rollback
from pipeline.registry.register import register
from tests.registry_helpers import NO_BUDGET, compress, register_only, sqlite_tracking


def _client(tracking):
    return MlflowClient(tracking.tracking_uri, tracking.tracking_uri)


def test_register_describes_the_model_and_its_version(work, tmp_path):
    figures = compress(work, ("int8_table",))
    tracking = sqlite_tracking(tmp_path)
    client = _client(tracking)
    client.create_registered_model("leanrec", description=LEGACY_MODEL_DESCRIPTION)  # as older releases left it
    result = register(NO_BUDGET, tracking, work)
    assert client.get_registered_model("leanrec").description == model_description("leanrec")
    assert "leanrec.champion_history" in model_description("leanrec") and "champion-history" in model_description("leanrec")
    version = client.get_model_version("leanrec", result["version"])
    text, entry = version.description, figures[result["candidate"]]
    assert text.startswith(f"**{result['candidate']}**: ")
    assert f"Registered by run `{version.run_id}`" in text
    assert f"NDCG@10 **{entry['ndcg@10']:.4f}** (test split, full ranking), HR@10 {entry['hr@10']:.4f}" in text
    assert f"size **{entry['size_bytes'] / 2**20:.2f} MiB** ({entry['size_bytes']:,} bytes on disk" in text
    assert f"latency p50 **{entry['latency_p50_ms']:.3f} ms**" in text
    if result["candidate"] != "teacher":
        assert f"{entry['ndcg@10_change']:+.2%} NDCG@10 against the teacher" in text
    # A description someone wrote for the model is theirs: a later register leaves it.
    client.update_registered_model("leanrec", description="our recommender, ask the data team")
    register(NO_BUDGET, tracking, work)
    assert client.get_registered_model("leanrec").description == "our recommender, ask the data team"


def test_the_gates_decisions_are_described_and_the_history_is_on_the_cli(work, tmp_path, capsys):
    tracking = sqlite_tracking(tmp_path)
    client = _client(tracking)
    register_only(work, tracking, "main")
    first = promote(RegistryConfig(), tracking, work)
    described = client.get_model_version("leanrec", "1").description
    assert f"Gate ({first['at']}): **Promoted**: the first champion, since {first['at']}." in described
    assert described.startswith("**teacher**: the full-precision SASRec teacher.")  # what it is stays first

    register_only(work, tracking, "random")  # untrained: worse
    worse = promote(RegistryConfig(), tracking, work)
    described = client.get_model_version("leanrec", "2").description
    assert "**Kept champion**: the gate rejected it; version 1 stays champion." in described
    assert (f"NDCG@10 on this run's test split: {worse['challenger']['ndcg@10']:.4f} against the champion's (version 1) "
            f"{worse['champion']['ndcg@10']:.4f}") in described
    assert worse["reasons"][-1] in described  # the gate's own reason, word for word

    shutil.copytree(work.model_dir("main"), work.root / "models" / "copy")  # equal quality: passes the gate
    (work.root / "models" / "copy" / "model_config.json").write_text(
        json.dumps({**json.loads((work.model_dir("main") / "model_config.json").read_text()), "dropout": 0.1}))
    register_only(work, tracking, "models/copy")
    assert promote(RegistryConfig(), tracking, work)["decision"] == "promoted"
    assert "replacing version 1." in client.get_model_version("leanrec", "3").description
    back = rollback(RegistryConfig(), tracking, work)
    described = client.get_model_version("leanrec", "3").description
    assert "**Promoted**" in described  # the gate's paragraph is kept
    assert described.endswith(f"**Rolled back** at {back['at']}: the champion moved back to version 1.")

    base = ["--workdir", str(work.root), "-S", f"tracking.tracking_uri={tracking.tracking_uri}"]
    assert main(["champion-history", *base]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["champion"] == "1"
    history = shown["history"]
    assert [(e["version"], e["event"]) for e in history] == [("1", "promoted"), ("3", "promoted"), ("1", "rolled_back")]
    assert [e["until"] for e in history] == [history[1]["at"], history[2]["at"], None]


REPORT = {"at": "2026-12-02T10:00:00+00:00", "challenger_version": "4", "champion_version": "2", "split": "test"}


@pytest.mark.parametrize(("report", "verdict"), [
    ({"decision": "refused", "champion_after": "2", "reasons": ["version 2 (champion) cannot be judged"]},
     "**Refused**: the gate could not judge it; version 2 stays champion."),
    ({"decision": "not_allowed", "champion_after": "2", "challenger": {"ndcg@10": 0.3}, "reasons": []},
     "**Not promoted**: it passed the gate, but registry.allow_promotion is false; version 2 stays champion."),
    ({"decision": "superseded", "champion_after": "5", "challenger": {"ndcg@10": 0.3}, "reasons": []},
     "**Not promoted**: the champion alias moved to version 5 while the gate ran; rerun promote."),
    ({"decision": "rejected", "champion_version": None, "champion_after": None,
      "challenger": {"ndcg@10": 0.123456789, "latency_p50_ms": 80.0},
      "reasons": ["challenger latency_p50_ms 80.0 is over the budget 50.0"]},
     "**Not promoted**: the gate rejected it; there is no champion yet."),
])
def test_every_decision_reads_as_words(report, verdict):
    text = gate_description({**REPORT, **report})
    assert text.startswith(f"Gate ({REPORT['at']}): {verdict}")
    assert all(f"- {reason}" in text for reason in report["reasons"])
    assert "0.123456789" not in text  # figures rounded
