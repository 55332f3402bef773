"""benchmarks/time_to_quality.py's helpers: the RecBole export keeps LeanRec's split, and time to target (no RecBole here)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from benchmarks.time_to_quality import best_record, export_inter, peer_config, targets_sha256, time_to_target
from tests.helpers import build_features


def recbole_leave_one_out(inter: pd.DataFrame) -> list[tuple[int, int]]:
    """What RecBole's LS valid_and_test with order TO does with the file: sort by the float32 timestamp (its
    FloatTensor), group by user, the second-last interaction of each user with 3+ is the validation target."""
    inter = inter.assign(ts=inter["timestamp:float"].astype(np.float32))
    inter = inter.sort_values("ts", kind="stable")
    pairs = []
    for user, rows in inter.groupby("user_id:token", sort=False):
        if len(rows) >= 3:
            pairs.append((int(user), int(rows["item_id:token"].iloc[-2])))
    return pairs


def test_export_holds_out_leanrecs_validation_targets(tmp_path):
    layout = build_features(tmp_path / "run")
    stats = export_inter(layout.features_dir, tmp_path / "recbole", "tiny")
    inter = pd.read_csv(stats["path"], sep="\t")
    assert list(inter.columns) == ["user_id:token", "item_id:token", "timestamp:float"]

    kept = pq.read_table(layout.features_dir / "interactions.parquet").to_pandas()
    assert stats["rows"] == len(inter) == len(kept)
    assert stats["items"] == kept["item_idx"].nunique() and stats["users"] == kept["user_idx"].nunique()
    leanrec_valid = kept.loc[kept["split"] == "valid", ["user_idx", "item_idx"]].itertuples(index=False)
    assert stats["n_valid_targets"] == (kept["split"] == "valid").sum() > 0
    assert stats["valid_targets_sha256"] == targets_sha256(leanrec_valid)
    # RecBole's split of the exported file picks the same (user, item) pairs, in any order.
    peer = recbole_leave_one_out(inter)
    assert targets_sha256(peer) == stats["valid_targets_sha256"]


def test_raw_epoch_seconds_as_float32_would_reorder_a_users_interactions():
    """Why the export writes ranks: 10 s apart at 2026's epoch seconds collapse to one float32 value (128 s apart)."""
    seconds = np.array([1_790_000_000, 1_790_000_010, 1_790_000_020], dtype=np.float64)
    assert len(np.unique(seconds.astype(np.float32))) < len(seconds)
    ranks = np.arange(2**24 - 3, 2**24, dtype=np.float64)
    assert len(np.unique(ranks.astype(np.float32))) == len(ranks)


def test_time_to_target_is_the_first_epoch_end_at_or_above_target():
    history = [{"epoch": 1, "valid_ndcg10": 0.05, "elapsed_seconds": 2.0},
               {"epoch": 2, "valid_ndcg10": 0.10, "elapsed_seconds": 4.0},
               {"epoch": 3, "valid_ndcg10": 0.09, "elapsed_seconds": 6.0},
               {"epoch": 4, "valid_ndcg10": 0.10, "elapsed_seconds": 8.0}]
    assert time_to_target(history, 0.10) == 4.0
    assert time_to_target(history, 0.095) == 4.0
    assert time_to_target(history, 0.11) is None
    assert best_record(history)["epoch"] == 2  # the first of equal bests
    assert best_record([]) is None


def test_peer_config_uses_leanrecs_split_metric_and_shape(tmp_path):
    ce = peer_config("CE", 5, 10, tmp_path, tmp_path, 42)
    assert ce["eval_args"] == {"split": {"LS": "valid_and_test"}, "group_by": "user", "order": "TO", "mode": "full"}
    assert ce["train_neg_sample_args"] is None and ce["loss_type"] == "CE"
    assert (ce["hidden_size"], ce["n_layers"], ce["n_heads"], ce["MAX_ITEM_LIST_LENGTH"]) == (64, 2, 2, 50)
    assert ce["valid_metric"] == "NDCG@10" and ce["filter_inter_by_user_or_item"] is False
    bpr = peer_config("BPR", 20, 10, tmp_path, tmp_path, 42)
    assert bpr["train_neg_sample_args"]["sample_num"] == 1 and bpr["epochs"] == 20
