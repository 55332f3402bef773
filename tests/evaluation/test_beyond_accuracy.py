"""Beyond-accuracy metrics (ILD, novelty, coverage, Gini) on hand-made lists with known values."""

import math

import numpy as np
import pytest
import torch

from pipeline.core.errors import EvaluateError
from pipeline.data.sequences import SequenceData
from pipeline.evaluation.metrics import (
    BEYOND_ACCURACY,
    ListMetrics,
    evaluate,
    gini_index,
    intra_list_diversity,
    novelty,
    self_information,
)
from pipeline.models.rerank import unit_rows

# Items 1..4: 1 and 2 point the same way, 3 is orthogonal to them, 4 is opposite to 1.
TABLE = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])


def two_users() -> SequenceData:
    # user A: 1 2 3 | valid 4 | test 5; user B: 2 3 | valid 1 | test 6 (as in test_evaluate.py)
    seqs = [[1, 2, 3, 4, 5], [2, 3, 1, 6]]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
    return SequenceData(users=np.array([1, 2]), offsets=offsets, items=np.concatenate(seqs), n_train=np.array([3, 2]),
                        n_valid=np.array([1, 1]), n_test=np.array([1, 1]), n_items=6, n_user_index=2)


def test_identical_vectors_have_no_diversity():
    values, has_pair = intra_list_diversity(torch.tensor([[1, 2]]), unit_rows(TABLE))
    assert has_pair.tolist() == [True]
    assert values.tolist() == pytest.approx([0.0])


def test_diversity_is_one_minus_the_mean_pairwise_cosine():
    unit = unit_rows(TABLE)
    values, _ = intra_list_diversity(torch.tensor([[1, 3, 0], [1, 4, 0], [1, 2, 3]]), unit)
    # cos(1,3) = 0; cos(1,4) = -1; {1,2,3}: cosines 1, 0, 0 -> mean 1/3
    assert values.tolist() == pytest.approx([1.0, 2.0, 1 - 1 / 3])


def test_padding_slots_take_part_in_no_pair():
    values, has_pair = intra_list_diversity(torch.tensor([[1, 3, 0], [2, 0, 0]]), unit_rows(TABLE))
    assert has_pair.tolist() == [True, False]  # one item: no pair, left out of the mean
    assert values[0].item() == pytest.approx(1.0)


def test_novelty_is_the_mean_self_information_of_training_popularity():
    counts = np.array([0, 4, 2, 1, 1, 0])  # 8 training interactions; item 5 never trained
    info = self_information(counts)
    assert info.tolist() == pytest.approx([0.0, 1.0, 2.0, 3.0, 3.0, 3.0])  # unseen counts as seen once
    values, valid = novelty(torch.tensor([[1, 2], [3, 0], [0, 0]]), info)
    assert values[:2].tolist() == pytest.approx([1.5, 3.0])
    assert valid.tolist() == [True, True, False]


def test_gini_of_exposure_known_values():
    assert gini_index(np.full(10, 7.0)) == pytest.approx(0.0)  # uniform exposure
    one_item = np.zeros(1000)
    one_item[3] = 500  # one item for everybody
    assert gini_index(one_item) == pytest.approx(999 / 1000)
    assert gini_index(np.array([0.0, 0.0, 1.0, 1.0])) == pytest.approx(0.5)  # half the items share it all
    assert gini_index(np.zeros(5)) == 0.0


def test_list_metrics_accumulate_over_batches_and_score_lists():
    counts = np.array([0, 4, 2, 1, 1])
    both = ListMetrics([1, 2], 4, counts, unit_rows(TABLE))
    both.add(torch.tensor([[1, 3], [2, 1]]), targets=torch.tensor([3, 2]))
    both.add(torch.tensor([[4, 1]]), targets=torch.tensor([2]))
    m = both.result()
    assert m["full/ILD@2"] == pytest.approx((1.0 + 0.0 + 2.0) / 3)
    assert m["full/Novelty@1"] == pytest.approx((1.0 + 2.0 + 3.0) / 3)
    assert m["full/Coverage@1"] == pytest.approx(3 / 4)  # items 1, 2, 4 head a list
    assert m["full/Coverage@2"] == 1.0
    # exposure at 2: item 1 three times, 2, 3, 4 once each -> sorted [1, 1, 1, 3], total 6
    assert m["full/Gini@2"] == pytest.approx(sum((2 * i - 5) * x for i, x in enumerate([1, 1, 1, 3], 1)) / (4 * 6))
    # targets at positions 1 (second), 0 (first), none
    assert m["full/HR@1"] == pytest.approx(1 / 3)
    assert m["full/HR@2"] == pytest.approx(2 / 3)
    assert m["full/NDCG@2"] == pytest.approx((1 / math.log2(3) + 1.0) / 3)
    assert set(BEYOND_ACCURACY) <= {name.split("/")[1].split("@")[0] for name in m}


def test_item_vectors_must_cover_the_catalogue():
    with pytest.raises(EvaluateError, match="item vectors have 5 rows, the catalogue 6 items"):
        ListMetrics([1], 6, np.ones(7), unit_rows(TABLE))


def test_evaluate_reports_beyond_accuracy_on_the_top_k_lists():
    data = two_users()  # user A has seen 1-4 before the test item, user B 2, 3, 1
    fixed = torch.tensor([0.0, 6, 5, 4, 3, 2, 1])
    table = torch.eye(7)  # every item orthogonal to every other: ILD 1
    m = evaluate(lambda b: fixed.expand(len(b.rows), -1), data, "test", ks=[2], max_len=10, sampled_strategies=(),
                 progress=False, beyond_accuracy=True, item_vectors=table)
    # Top-2: A -> [5, 6], B -> [4, 5]
    assert m["full/ILD@2"] == pytest.approx(1.0)
    assert m["full/Coverage@2"] == pytest.approx(3 / 6)
    info = self_information(data.train_item_counts())
    assert m["full/Novelty@2"] == pytest.approx(float(info[[5, 6, 4, 5]].mean()))
    # exposure over items 1..6: [0, 0, 0, 1, 2, 1]
    assert m["full/Gini@2"] == pytest.approx(gini_index(np.array([0, 0, 0, 1, 2, 1])))
    plain = evaluate(lambda b: fixed.expand(len(b.rows), -1), data, "test", ks=[2], max_len=10, sampled_strategies=(),
                     progress=False)
    assert "full/ILD@2" not in plain and "full/Gini@2" not in plain  # per-epoch validation pays nothing extra
    assert {k: v for k, v in m.items() if k in plain} == plain
