"""register / promote / rollback against a temporary SQLite registry (and, slow, a real `mlflow server`)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from mlflow import MlflowClient
from pipeline.core.config import PolicyConfig, RegistryConfig, TrackingConfig
from pipeline.core.errors import RegistryError
from pipeline.orchestration.cli import main
from pipeline.registry import promote as promotion
from pipeline.registry.promote import promote, rollback
from pipeline.registry.register import register, select_candidate
from tests.helpers import copy_repo
from tests.mlflow_server import WORKER, auth_env, wait_for_login, worker_credentials
from tests.registry_helpers import (
    NO_BUDGET,
    aliases,
    compress,
    measure,
    register_only,
    save_random_model,
    sqlite_tracking,
    write_compression,
)

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- policy


def _report(**models):
    return {"models": {name: {"ndcg@10": n, "hr@10": n, "latency_p50_ms": lat, "size_bytes": size}
                       for name, (n, lat, size) in models.items()}}


def test_policy_picks_best_metric_within_budgets():
    report = _report(teacher=(0.30, 5.0, 1000), int8=(0.31, 2.0, 300), lowrank=(0.35, 9.0, 200), int4=(0.32, 2.0, 900))
    assert select_candidate(report, PolicyConfig(min_latency_speedup=None))[0] == "lowrank"
    assert select_candidate(report, PolicyConfig(max_latency_p50_ms=6.0))[0] == "int4"
    best, reasons = select_candidate(report, PolicyConfig(max_latency_p50_ms=6.0, max_size_bytes=500, min_latency_speedup=None))
    assert best == "int8"
    assert "over the budget" in reasons["lowrank"] and "size_bytes" in reasons["int4"]
    assert select_candidate(report, PolicyConfig(candidates=["teacher", "int8"]))[0] == "int8"


def test_policy_never_picks_a_variant_slower_than_the_teacher():
    report = _report(teacher=(0.30, 5.0, 1000), bf16=(0.31, 5.5, 500), int8=(0.30, 2.0, 300))
    best, reasons = select_candidate(report, PolicyConfig())  # default: at least as fast as the teacher
    assert best == "int8"
    assert reasons["bf16"] == "latency speed-up 0.91x over the teacher is under the minimum 1.0x"
    assert select_candidate(report, PolicyConfig(min_latency_speedup=None))[0] == "bf16"
    with pytest.raises(RegistryError, match="int8: latency speed-up 2.50x over the teacher is under the minimum 3.0x"):
        select_candidate(report, PolicyConfig(min_latency_speedup=3.0))
    no_teacher = {"models": {"int8": {"ndcg@10": 0.3, "latency_p50_ms": 2.0, "size_bytes": 1}}}
    with pytest.raises(RegistryError, match="int8: no latency measured beside the teacher's"):
        select_candidate(no_teacher, PolicyConfig())


def test_policy_ties_go_to_the_smaller_model():
    assert select_candidate(_report(teacher=(0.3, 1.0, 1000), int8=(0.3, 1.0, 250)), PolicyConfig())[0] == "int8"


def test_policy_errors_name_the_problem():
    report = _report(teacher=(0.3, 5.0, 1000))
    with pytest.raises(RegistryError, match="no model meets the registry policy: teacher: latency_p50_ms 5.0 over the budget 1.0"):
        select_candidate(report, PolicyConfig(max_latency_p50_ms=1.0))
    with pytest.raises(RegistryError, match=r"candidates \['int8'\] are not in compression.json"):
        select_candidate(report, PolicyConfig(candidates=["int8"]))


# ----------------------------------------------------------------------------- register


def test_register_tags_aliases_and_is_idempotent(work, tmp_path):
    figures = compress(work, ("int8_table", "int4_table"))
    tracking = sqlite_tracking(tmp_path)
    first = register(NO_BUDGET, tracking, work)
    best = select_candidate(json.loads((work.reports_dir / "compression.json").read_text()), NO_BUDGET.policy)[0]
    assert first["candidate"] == best and first["created"] and first["version"] == "1"
    assert json.loads((work.reports_dir / "registration.json").read_text())["version"] == "1"
    client = MlflowClient(tracking.tracking_uri, tracking.tracking_uri)
    version = client.get_model_version_by_alias("leanrec", "challenger")
    assert str(version.version) == "1"
    tags = version.tags
    assert tags["leanrec.variant"] == best and tags["leanrec.path"] == figures[best]["path"]
    # Rounded to what they are worth (4 decimals of quality, microseconds), still numbers.
    assert tags["leanrec.metric.ndcg_at_10"] == f"{figures[best]['ndcg@10']:.4f}"
    assert float(tags["leanrec.metric.latency_p50_ms"]) == pytest.approx(figures[best]["latency_p50_ms"], abs=5e-4)
    assert len(tags["leanrec.features.sha256"]) == 64 and len(tags["leanrec.content_sha256"]) == 64
    assert "leanrec.git_commit" in tags
    # The Pareto chart with the candidate marked, beside the report and in the register run.
    assert (work.reports_dir / "registration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "reports/registration.png" in [a.path for a in client.list_artifacts(version.run_id, "reports")]
    # Same files again (a `dvc repro` rerun): no new version.
    again = register(NO_BUDGET, tracking, work)
    assert again["version"] == "1" and not again["created"]
    assert len(client.search_model_versions("name='leanrec'")) == 1
    # A policy that excludes the pick registers another model as a new version.
    others = [n for n in figures if n != best]
    third = register(RegistryConfig(policy=NO_BUDGET.policy.model_copy(update={"candidates": others})), tracking, work)
    assert third["candidate"] in others and third["version"] == "2"
    assert aliases(tracking) == {"challenger": "2"}


def test_register_needs_compression_report_and_tracking(work, tmp_path):
    with pytest.raises(RegistryError, match="compression.json not found"):
        register(RegistryConfig(), sqlite_tracking(tmp_path), work)
    compress(work, ())
    with pytest.raises(RegistryError, match="tracking.enabled=true"):
        register(NO_BUDGET, TrackingConfig(enabled=False), work)


# ----------------------------------------------------------------------------- promote / rollback


def test_first_model_becomes_champion_then_gate_both_ways_and_rollback(work, tmp_path):
    tracking = sqlite_tracking(tmp_path)
    register_only(work, tracking, "main")
    first = promote(RegistryConfig(), tracking, work)
    assert first["decision"] == "promoted" and first["champion_version"] is None
    assert aliases(tracking) == {"challenger": "1", "champion": "1"}
    assert promote(RegistryConfig(), tracking, work)["decision"] == "unchanged"

    # A worse model (untrained): registered as challenger, not promoted.
    register_only(work, tracking, "random")
    worse = promote(RegistryConfig(), tracking, work)
    assert worse["decision"] == "rejected" and not worse["promoted"]
    assert worse["challenger"]["ndcg@10"] < worse["champion"]["ndcg@10"] * 0.99
    assert aliases(tracking) == {"challenger": "2", "champion": "1"}
    saved = json.loads((work.reports_dir / "promotion.json").read_text())
    assert saved["decision"] == "rejected" and saved["champion_after"] == "1"
    client = MlflowClient(tracking.tracking_uri, tracking.tracking_uri)
    tags = client.get_model_version("leanrec", "2").tags
    assert tags["leanrec.promotion.decision"] == "rejected"
    assert float(tags["leanrec.promotion.champion_ndcg_at_10"]) == pytest.approx(worse["champion"]["ndcg@10"], abs=1e-6)

    # Within tolerance: a copy of the champion's weights under another name passes the gate (equal NDCG@10).
    shutil.copytree(work.model_dir("main"), work.root / "models" / "copy")
    (work.root / "models" / "copy" / "model_config.json").write_text(
        json.dumps({**json.loads((work.model_dir("main") / "model_config.json").read_text()), "dropout": 0.1}))
    register_only(work, tracking, "models/copy")
    better = promote(RegistryConfig(), tracking, work)
    assert better["decision"] == "promoted" and better["challenger"]["ndcg@10"] == pytest.approx(better["champion"]["ndcg@10"])
    assert aliases(tracking)["champion"] == "3"
    assert client.get_model_version("leanrec", "3").tags["leanrec.previous_champion"] == "1"

    back = rollback(RegistryConfig(), tracking, work)
    assert back == {**back, "rolled_back": "3", "champion": "1"}
    assert aliases(tracking)["champion"] == "1"
    with pytest.raises(RegistryError, match="first champion"):
        rollback(RegistryConfig(), tracking, work)
    # The rolled-back version is not promoted again by a rerun of promote.
    again = promote(RegistryConfig(), tracking, work, version="3")
    assert again["decision"] == "rejected" and "rolled back" in again["reasons"][-1]
    assert aliases(tracking)["champion"] == "1"


def test_latency_budget_blocks_promotion(work, tmp_path):
    tracking = sqlite_tracking(tmp_path)
    register_only(work, tracking, "random")
    promote(RegistryConfig(), tracking, work)
    register_only(work, tracking, "main", NO_BUDGET, latency_p50_ms=80.0)  # better, but slow
    assert RegistryConfig().policy.max_latency_p50_ms == 50.0  # the default budget (params.yaml's)
    result = promote(RegistryConfig(), tracking, work)
    assert result["decision"] == "rejected" and "over the budget 50.0" in result["reasons"][0]
    assert result["challenger"]["ndcg@10"] > result["champion"]["ndcg@10"]
    assert aliases(tracking)["champion"] == "1"
    assert promote(NO_BUDGET, tracking, work)["decision"] == "promoted"  # no budget: the better model wins


def test_no_challenger_and_no_champion_errors(work, tmp_path):
    tracking = sqlite_tracking(tmp_path)
    with pytest.raises(RegistryError, match="no 'challenger' alias"):
        promote(RegistryConfig(), tracking, work)
    with pytest.raises(RegistryError, match="no 'champion'"):
        rollback(RegistryConfig(), tracking, work)


@pytest.mark.parametrize("fail_at", ["decision_tag", "report"])
def test_failure_mid_promotion_leaves_aliases_as_they_were(work, tmp_path, monkeypatch, fail_at):
    tracking = sqlite_tracking(tmp_path)
    register_only(work, tracking, "random")
    promote(RegistryConfig(), tracking, work)
    register_only(work, tracking, "main")
    before = aliases(tracking)
    assert before == {"challenger": "2", "champion": "1"}
    if fail_at == "decision_tag":  # after the alias moved: the tags fail
        original = MlflowClient.set_model_version_tag

        def failing(self, name, version, key, value):
            if key == promotion.TAG_DECISION:
                raise RuntimeError("store went away")
            return original(self, name, version, key, value)

        monkeypatch.setattr(MlflowClient, "set_model_version_tag", failing)
    else:  # the last step, after alias and tags
        def failing_write(data, target):
            raise OSError("disk full")

        monkeypatch.setattr(promotion, "write_json", failing_write)
    with pytest.raises(RegistryError, match="aliases left as they were"):
        promote(RegistryConfig(), tracking, work)
    assert aliases(tracking) == before
    monkeypatch.undo()
    assert promote(RegistryConfig(), tracking, work)["decision"] == "promoted"


def test_failure_before_first_champion_leaves_no_champion(work, tmp_path, monkeypatch):
    tracking = sqlite_tracking(tmp_path)
    register_only(work, tracking, "main")
    monkeypatch.setattr(promotion, "write_json", lambda data, target: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(RegistryError):
        promote(RegistryConfig(), tracking, work)
    assert aliases(tracking) == {"challenger": "1"}


def test_concurrent_promotions_are_serialised_and_the_second_is_gated_against_the_first(work, tmp_path, monkeypatch):
    tracking = sqlite_tracking(tmp_path)
    register_only(work, tracking, "random")
    promote(RegistryConfig(), tracking, work)
    versions = [register_only(work, tracking, "main")["version"]]
    shutil.copytree(work.model_dir("main"), work.root / "models" / "copy")
    (work.root / "models" / "copy" / "model_config.json").write_text(
        json.dumps({**json.loads((work.model_dir("main") / "model_config.json").read_text()), "dropout": 0.1}))
    versions.append(register_only(work, tracking, "models/copy")["version"])
    # Both promotions read the same champion and reach the lock together: the race is forced, not hoped for.
    barrier = threading.Barrier(2, timeout=60)
    original_lock = promotion.promotion_lock

    def lock_together(*args, **kwargs):
        barrier.wait()
        return original_lock(*args, **kwargs)

    monkeypatch.setattr(promotion, "promotion_lock", lock_together)
    client = MlflowClient(tracking.tracking_uri, tracking.tracking_uri)
    seen, errors, results = [], [], {}
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.append(str(client.get_model_version_by_alias("leanrec", "champion").version))
            time.sleep(0.005)

    def run(version):
        try:
            results[version] = promote(RegistryConfig(), tracking, work, version=version)
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    watcher = threading.Thread(target=watch)
    watcher.start()
    workers = [threading.Thread(target=run, args=(v,)) for v in versions]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=180)
    done.set()
    watcher.join(timeout=30)
    assert not errors, errors
    assert seen and set(seen) <= {"1", *versions}
    # One ran first against version 1; the other waited for the lock and was gated against the first's result.
    first, second = sorted(results.values(), key=lambda r: r["champion_version"] != "1")
    assert first["champion_version"] == "1" and first["decision"] == "promoted"
    assert second["champion_version"] == first["challenger_version"] and second["decision"] == "promoted"
    final = str(client.get_model_version_by_alias("leanrec", "champion").version)
    assert final == second["challenger_version"]
    # The rollback chain skips nothing: second -> first -> 1.
    monkeypatch.undo()
    assert rollback(RegistryConfig(), tracking, work)["champion"] == first["challenger_version"]
    assert rollback(RegistryConfig(), tracking, work)["champion"] == "1"
    assert not client.search_registered_models("name='leanrec.promotion-lock'")  # released


def test_cli_register_promote_rollback(work, tmp_path, capsys):
    compress(work, ("int8_table",))
    uri = f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"
    base = ["--workdir", str(work.root), "-S", uri]
    assert main(["register", *base]) == 0
    assert json.loads(capsys.readouterr().out)["alias"] == "challenger"
    assert main(["promote", *base]) == 0
    assert json.loads(capsys.readouterr().out)["decision"] == "promoted"
    assert main(["rollback", *base]) == 2  # the first champion has nothing to roll back to
    assert main(["recommend", "--model-version", "1", *base]) == 2  # --model-version is for promote only


# ----------------------------------------------------------------------------- a real tracking server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(url: str, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {_output(proc)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds}s: {_output(proc)}")


def start_server(cmd: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    """A server in its own process group, its output to a file (a full pipe would block it)."""
    log = open(cwd / "server.log", "w")  # noqa: SIM115 - closed by _stop
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = cwd / "server.log"  # type: ignore[attr-defined]
    proc.log_file = log  # type: ignore[attr-defined]
    return proc


def _output(proc: subprocess.Popen) -> str:
    path = getattr(proc, "log_path", None)
    return path.read_text(errors="replace")[-4000:] if path and path.exists() else ""


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and every process it started (its process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)
    else:  # the leader exited: workers it left in the group must not outlive the test
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
    if getattr(proc, "log_file", None):
        proc.log_file.close()


@pytest.mark.slow
def test_register_and_promote_against_a_tracking_server(work, tmp_path, monkeypatch):
    port = _free_port()
    passwords = auth_env()  # server.sh runs MLflow's basic-auth app; the stages log in as the worker
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/server.db",
           "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{tmp_path}/auth.db",
           "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "server-artifacts"),
           "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port), **passwords}
    env.pop("MLFLOW_TRACKING_URI", None)
    for key, value in worker_credentials(passwords).items():
        monkeypatch.setenv(key, value)
    proc = start_server(["bash", str(ROOT / "mlflow" / "server.sh")], tmp_path, env)
    try:
        wait_for_login(f"http://127.0.0.1:{port}", WORKER, passwords["LEANREC_MLFLOW_WORKER_PASSWORD"], proc)
        tracking = TrackingConfig(tracking_uri=f"http://127.0.0.1:{port}")
        compress(work, ("int8_table",))
        registered = register(NO_BUDGET, tracking, work)
        assert promote(RegistryConfig(), tracking, work)["decision"] == "promoted"
        save_random_model(work, "random", seed=3)
        write_compression(work, {"teacher": measure(work, work.model_dir("random"), "fp32")})
        worse = register(NO_BUDGET, tracking, work)
        assert promote(RegistryConfig(), tracking, work)["decision"] == "rejected"
        client = MlflowClient(tracking.tracking_uri, tracking.tracking_uri)
        aliases = {a: str(v) for a, v in client.get_registered_model("leanrec").aliases.items()}
        assert aliases == {"champion": registered["version"], "challenger": worse["version"]}
        # The artifacts went through the server (proxied), not to a local folder of the client.
        assert any((tmp_path / "server-artifacts").rglob("MLmodel"))
    finally:
        _stop(proc)


# ----------------------------------------------------------------------------- the DVC pipeline, end to end


@pytest.mark.slow
def test_dvc_repro_ends_with_a_champion_and_a_worse_run_is_not_promoted(tmp_path):
    repo = copy_repo(tmp_path / "repo", epochs=15)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "GX_ANALYTICS_ENABLED": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)

    def dvc(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"dvc {args} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    first = dvc("repro")
    for stage in ("register", "promote", "recommend"):
        assert f"Running stage '{stage}'" in first
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{repo}/mlflow.db")
    assert aliases(tracking) == {"challenger": "1", "champion": "1"}
    assert json.loads((repo / "reports/promotion.json").read_text())["decision"] == "promoted"
    assert json.loads((repo / "reports/recommend.json").read_text())["version"] == "1"
    assert "Running stage" not in dvc("repro")  # nothing changed: no stage, no new version

    dvc("exp", "run", "-S", "train.epochs=1")  # the deliberately worse config of the README
    promotion = json.loads((repo / "reports/promotion.json").read_text())
    assert promotion["decision"] == "rejected", promotion
    assert promotion["challenger"]["ndcg@10"] < promotion["champion"]["ndcg@10"]
    assert aliases(tracking) == {"challenger": "2", "champion": "1"}
    assert json.loads((repo / "reports/recommend.json").read_text())["version"] == "1"


def test_scoring_matches_items_by_raw_id_when_the_vocabulary_differs(trained):
    """A champion registered on other data numbers its items differently: scores follow the raw IDs."""
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq
    import torch

    from pipeline.models.recommender import Recommender
    from pipeline.models.sasrec import SASRec, load_model
    from pipeline.serving.pyfunc import ITEMS_FILE, USERS_FILE, Servable, build_serving_data

    data_dir = build_serving_data(trained.features_dir, trained.root / "serving")
    items, users = pd.read_parquet(data_dir / ITEMS_FILE), pq.read_table(data_dir / USERS_FILE)
    teacher = load_model(trained.model_dir("main"))
    same = Servable(Recommender(teacher), items, users)

    n = teacher.cfg.n_items
    new_index = np.concatenate([[0], np.random.default_rng(0).permutation(n) + 1])  # old index -> new index
    permuted = SASRec(teacher.cfg)
    state = teacher.state_dict()
    table = torch.zeros_like(state["item_embedding.weight"])
    table[torch.from_numpy(new_index)] = state["item_embedding.weight"]
    permuted.load_state_dict({**state, "item_embedding.weight": table})
    renumbered = items.assign(index=new_index[items["index"].to_numpy()].astype(np.int32))
    other = Servable(Recommender(permuted.eval()), renumbered, users)
    assert other.item_index != same.item_index

    expected = promotion.score_on_split(same, trained.features_dir)
    got = promotion.score_on_split(other, trained.features_dir)
    assert got["ndcg@10"] == pytest.approx(expected["ndcg@10"], abs=1e-9) and got["users"] == expected["users"]
    assert expected["ndcg@10"] > 0.05  # a trained model, not a constant scorer

    # A model that knows only half of today's items: the others are never recommended (so they cannot be
    # hits), histories keep the known items, and users with none of them get the popularity ranking.
    from pipeline.data.sequences import load_sequences
    from pipeline.models.sasrec import SASRecConfig

    kept = np.arange(1, n + 1)[::2]  # old indices the smaller model keeps
    small = SASRec(SASRecConfig(**{**teacher.cfg.to_dict(), "n_items": len(kept)}))
    small_table = torch.cat([state["item_embedding.weight"][:1], state["item_embedding.weight"][torch.from_numpy(kept)]])
    small.load_state_dict({**state, "item_embedding.weight": small_table})
    subset = items.set_index("index").loc[kept].reset_index()
    subset["index"] = np.arange(1, len(kept) + 1, dtype=np.int32)
    half = promotion.score_on_split(Servable(Recommender(small.eval()), subset, users), trained.features_dir)
    data = load_sequences(trained.features_dir)
    has_test = data.n_test > 0
    targets = data.items[data.offsets[:-1][has_test] + data.n_train[has_test] + data.n_valid[has_test]]
    known_share = np.isin(targets, kept).mean()
    assert 0 < half["hr@10"] <= known_share
