import math

import numpy as np
import pytest
import torch

from pipeline.data.sequences import SequenceData
from pipeline.evaluation.metrics import evaluate, metrics_from_ranks, target_ranks
from pipeline.models.baselines import popularity_scores


def test_metrics_against_hand_computed_values():
    ranks = torch.tensor([0, 1, 9, 10, 49])
    m = metrics_from_ranks(ranks, [10])
    assert m["HR@10"].tolist() == [1, 1, 1, 0, 0]
    expected_ndcg = [1.0, 1 / math.log2(3), 1 / math.log2(11), 0.0, 0.0]
    assert m["NDCG@10"].tolist() == pytest.approx(expected_ndcg)
    assert m["MRR"].tolist() == pytest.approx([1, 1 / 2, 1 / 10, 1 / 11, 1 / 50])
    assert m["Recall@10"].tolist() == m["HR@10"].tolist()


def test_target_rank_counts_strictly_better_items():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.4, 0.1, 0.2, 0.3]])
    assert target_ranks(scores, torch.tensor([2, 0])).tolist() == [1, 0]


def test_ties_are_broken_at_random_not_in_the_targets_favour():
    scores = torch.zeros(2000, 11)  # a constant scorer: every item tied
    ranks = target_ranks(scores, torch.zeros(2000, dtype=torch.long), torch.Generator().manual_seed(0))
    assert ranks.min() == 0 and ranks.max() == 10
    assert ranks.float().mean().item() == pytest.approx(5.0, abs=0.3)


def _data() -> SequenceData:
    # Two users over 6 items; user A: 1 2 3 | valid 4 | test 5; user B: 2 3 | valid 1 | test 6
    seqs = [[1, 2, 3, 4, 5], [2, 3, 1, 6]]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
    return SequenceData(
        users=np.array([1, 2]), offsets=offsets, items=np.concatenate(seqs), n_train=np.array([3, 2]),
        n_valid=np.array([1, 1]), n_test=np.array([1, 1]), n_items=6, n_user_index=2,
    )


def test_full_ranking_excludes_seen_items():
    data = _data()
    # A scorer that loves item 1, then 2, ... : seen items must not count as ranked above the target.
    fixed = torch.tensor([0.0, 6, 5, 4, 3, 2, 1])
    score = lambda batch: fixed.expand(len(batch.rows), -1)  # noqa: E731
    m = evaluate(score, data, "test", ks=[1, 2], max_len=10, sampled_strategies=(), progress=False)
    # User A (test 5) has seen 1-4: item 5 ranks first. User B (test 6) has seen 2,3,1: 4 and 5 beat 6 -> rank 2.
    assert m["full/HR@1"] == pytest.approx(0.5)
    assert m["full/HR@2"] == pytest.approx(0.5)
    assert m["full/MRR"] == pytest.approx((1 + 1 / 3) / 2)
    assert m["users"] == 2
    # Coverage@1: top-1 lists are {5} and {4} -> 2 of 6 items.
    assert m["full/Coverage@1"] == pytest.approx(2 / 6)


def test_valid_split_uses_train_prefix_only():
    data = _data()
    fixed = torch.tensor([0.0, 6, 5, 4, 3, 2, 1])
    m = evaluate(lambda b: fixed.expand(len(b.rows), -1), data, "valid", ks=[1], max_len=10, sampled_strategies=(), progress=False)
    # User A seen 1,2,3 -> top is 4 = valid target (hit). User B seen 2,3 -> top is 1 = valid target (hit).
    assert m["full/HR@1"] == 1.0


def test_sampled_protocol_ranks_against_unseen_negatives_only():
    data = _data()
    # A perfect scorer for the test target still ranks first among sampled negatives; and the
    # number of negatives is capped by how many unseen items exist.
    def oracle(batch):
        scores = torch.zeros(len(batch.rows), 7)
        scores[torch.arange(len(batch.rows)), batch.targets] = 10.0
        return scores
    m = evaluate(oracle, data, "test", ks=[1], sampled_negatives=100, sampled_strategies=("uniform", "popularity"), progress=False)
    assert m["sampled_uniform_100/HR@1"] == 1.0
    assert m["sampled_popularity_100/HR@1"] == 1.0

    def anti(batch):
        return -oracle(batch)
    m = evaluate(anti, data, "test", ks=[1], sampled_negatives=1, sampled_strategies=("uniform",), progress=False)
    assert m["sampled_uniform_1/HR@1"] == 0.0
    assert m["sampled_uniform_1/MRR"] == pytest.approx(0.5)


def test_popularity_scorer_uses_train_counts():
    data = _data()
    counts = data.train_item_counts()
    assert counts.tolist() == [0, 1, 2, 2, 0, 0, 0]
    m = evaluate(popularity_scores(counts), data, "valid", ks=[3], max_len=10, sampled_strategies=(), progress=False)
    assert 0.0 <= m["full/HR@3"] <= 1.0


def test_cut_offs_above_the_catalogue_are_refused_before_scoring(tmp_path):
    from pipeline.core.config import params_from_dict
    from pipeline.core.errors import EvaluateError
    from pipeline.data.sequences import load_sequences
    from pipeline.evaluation.evaluate import run_evaluate
    from tests.helpers import build_features

    layout = build_features(tmp_path)  # no model trained: the check comes before any is looked for
    n_items = load_sequences(layout.features_dir).n_items
    params = params_from_dict({}, [f"evaluate.ks=[10,{n_items + 1},100000]", "tracking.enabled=false"])
    with pytest.raises(EvaluateError, match=rf"evaluate\.ks \[{n_items + 1}, 100000\] exceed the catalogue's {n_items:,} items"):
        run_evaluate(params.evaluate, params.train, params.tracking, layout, seed=0)
