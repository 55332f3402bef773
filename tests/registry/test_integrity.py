"""A corrupt or deleted champion, and the promotion lock: clear errors, and the gate still works."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from mlflow import MlflowClient
from pipeline.core.config import RegistryConfig
from pipeline.core.errors import RegistryError
from pipeline.orchestration.cli import main
from pipeline.registry.promote import promote, rollback
from pipeline.registry.store import TAG_ARTIFACTS, champion_history, load_champion, promotion_lock
from tests.registry_helpers import aliases, copy_of_teacher, register_only, sqlite_tracking, stored_model_dir


def _client(tracking):
    return MlflowClient(tracking.tracking_uri, tracking.tracking_uri)


def _two_champions(work, tracking) -> None:
    """Version 1 champion, then version 2 (same weights, other config) promoted over it."""
    register_only(work, tracking, "main")
    assert promote(RegistryConfig(), tracking, work)["decision"] == "promoted"
    register_only(work, tracking, copy_of_teacher(work, "copy", 0.1))
    assert promote(RegistryConfig(), tracking, work)["decision"] == "promoted"
    assert aliases(tracking)["champion"] == "2"


def _weights(tracking, version: str):
    return next(stored_model_dir(tracking, version).rglob("model.safetensors"))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_corrupt_champion_is_refused_and_the_gate_uses_the_last_healthy_one(work, tmp_path, damage):
    tracking = sqlite_tracking(tmp_path)
    _two_champions(work, tracking)
    assert len(_client(tracking).get_model_version("leanrec", "2").tags[TAG_ARTIFACTS]) == 64
    weights = _weights(tracking, "2")
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    else:  # a flipped byte in the middle of a tensor: the model would load and serve wrong scores
        middle = len(data) - len(data) // 4
        weights.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    with pytest.raises(RegistryError, match="leanrec version 2 is corrupt: its artifacts' sha256 differs"):
        load_champion(RegistryConfig(), tracking, work.root)

    register_only(work, tracking, copy_of_teacher(work, "copy2", 0.2))
    result = promote(RegistryConfig(), tracking, work)
    assert result["champion_version"] == "2" and result["reference_version"] == "1"
    assert "version 2 is corrupt" in result["skipped_champions"][0]
    assert result["decision"] == "promoted" and aliases(tracking)["champion"] == "3"
    assert _client(tracking).get_model_version("leanrec", "3").tags["leanrec.previous_champion"] == "1"
    assert load_champion(RegistryConfig(), tracking, work.root)[1] == "3"


def test_a_corrupt_only_champion_refuses_with_what_to_do(work, tmp_path, caplog):
    tracking = sqlite_tracking(tmp_path)
    register_only(work, tracking, "main")
    promote(RegistryConfig(), tracking, work)
    _weights(tracking, "1").write_bytes(b"")
    register_only(work, tracking, copy_of_teacher(work, "copy", 0.1))
    result = promote(RegistryConfig(), tracking, work)
    assert result["decision"] == "refused" and aliases(tracking)["champion"] == "1"
    assert "no earlier champion can be scored" in result["reasons"][-1] and "roll back" in result["reasons"][-1]
    # The CLI answers with the message, not a traceback.
    base = ["--workdir", str(work.root), "-S", f"tracking.tracking_uri={tracking.tracking_uri}"]
    assert main(["recommend", *base]) == 2
    assert "recommend failed: leanrec version 1 is corrupt" in caplog.text


def test_a_corrupt_challenger_is_rejected_not_raised(work, tmp_path):
    tracking = sqlite_tracking(tmp_path)
    register_only(work, tracking, "main")
    _weights(tracking, "1").write_bytes(b"not a model")
    result = promote(RegistryConfig(), tracking, work)
    assert result["decision"] == "rejected" and "the challenger cannot be served" in result["reasons"][0]
    assert "champion" not in aliases(tracking)


def test_a_deleted_champion_is_replaced_only_through_the_gate(work, tmp_path):
    tracking = sqlite_tracking(tmp_path)
    _two_champions(work, tracking)
    client = _client(tracking)
    client.delete_model_version("leanrec", "2")  # MLflow drops its aliases with it
    assert "champion" not in aliases(tracking)
    with pytest.raises(RegistryError, match="its last champion, version 2, is gone"):
        load_champion(RegistryConfig(), tracking, work.root)
    # A much worse model is gated against version 1 (the last champion that can be scored), not waved through.
    from tests.registry_helpers import save_random_model

    save_random_model(work, "worse", seed=5)
    worse = register_only(work, tracking, "models/worse")["version"]
    result = promote(RegistryConfig(), tracking, work, version=worse)
    assert result["decision"] == "rejected" and result["reference_version"] == "1"
    assert "leanrec has no version 2" in result["skipped_champions"][0]
    assert "champion" not in aliases(tracking)
    good = register_only(work, tracking, copy_of_teacher(work, "copy2", 0.2))["version"]
    assert promote(RegistryConfig(), tracking, work, version=good)["decision"] == "promoted"
    assert [e["version"] for e in champion_history(client, "leanrec")] == ["1", "2", good]


def test_promote_and_rollback_on_deleted_versions_are_clear_errors(work, tmp_path):
    tracking = sqlite_tracking(tmp_path)
    _two_champions(work, tracking)
    with pytest.raises(RegistryError, match=r"leanrec has no version 99 \(deleted, or never registered\); its versions are \[1, 2\]"):
        promote(RegistryConfig(), tracking, work, version="99")
    register_only(work, tracking, copy_of_teacher(work, "copy2", 0.2))
    assert promote(RegistryConfig(), tracking, work)["decision"] == "promoted"  # 3 over 2 over 1
    client = _client(tracking)
    client.delete_model_version("leanrec", "2")
    back = rollback(RegistryConfig(), tracking, work)  # 2 is gone: the newest earlier champion that exists
    assert back["champion"] == "1" and "no version 2" in back["skipped"][0]
    with pytest.raises(RegistryError, match="version 1 was the first champion"):
        rollback(RegistryConfig(), tracking, work)
    register_only(work, tracking, copy_of_teacher(work, "copy3", 0.3))
    assert promote(RegistryConfig(), tracking, work)["decision"] == "promoted"  # 4 over 1
    client.delete_model_version("leanrec", "1")
    with pytest.raises(RegistryError, match="no earlier champion exists any more"):
        rollback(RegistryConfig(), tracking, work)


def test_a_lock_left_by_a_dead_process_is_broken_and_a_live_one_waited_for(work, tmp_path):
    tracking = sqlite_tracking(tmp_path)
    register_only(work, tracking, "main")
    client = _client(tracking)
    dead = {"host": socket.gethostname(), "pid": 2**22 + 12345, "since": time.time(), "token": "crashed"}
    client.create_registered_model("leanrec.promotion-lock", description=json.dumps(dead))
    assert promote(RegistryConfig(), tracking, work)["decision"] == "promoted"  # broke the stale lock
    assert not client.search_registered_models("name='leanrec.promotion-lock'")
    register_only(work, tracking, copy_of_teacher(work, "copy", 0.1))

    def live_lock():  # held by this (running) process, taken just now
        alive = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "token": "running"}
        client.create_registered_model("leanrec.promotion-lock", description=json.dumps(alive))

    live_lock()
    with pytest.raises(RegistryError, match="another promotion or rollback of leanrec holds the lock"):
        with promotion_lock(client, "leanrec", timeout_s=2.0):
            pass
    client.delete_registered_model("leanrec.promotion-lock")
    live_lock()
    with pytest.raises(RegistryError, match="holds the lock"):
        promote(RegistryConfig(lock_timeout_s=2.0), tracking, work)
    assert aliases(tracking)["champion"] == "1"
    client.delete_registered_model("leanrec.promotion-lock")

    # A running promotion is waited for, then the waiter proceeds.
    def hold():
        with promotion_lock(client, "leanrec", timeout_s=60):
            held.set()
            time.sleep(1.0)

    held = threading.Event()
    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(30)
    started = time.monotonic()
    assert promote(RegistryConfig(), tracking, work)["decision"] == "promoted"
    assert time.monotonic() - started >= 0.5
    holder.join()
