"""MMR re-ranking: lambda 0 is the model's top-k, lambda > 0 diversifies, nothing is duplicated or seen."""

import pytest
import torch

from pipeline.evaluation.metrics import intra_list_diversity
from pipeline.models.recommender import Recommender
from pipeline.models.rerank import CANDIDATES_PER_K, candidate_count, mmr_rerank, unit_rows
from pipeline.models.sasrec import SASRec, SASRecConfig

# Items 1 and 2 point the same way, 3 is orthogonal to them, 4 is half-way between 1 and 3.
TABLE = unit_rows(torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))


def _tiny() -> tuple[Recommender, list[list[int]]]:
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=60, d_model=16, n_layers=1, n_heads=2, max_len=8, dropout=0.0))
    generator = torch.Generator().manual_seed(1)
    histories = [torch.randint(1, 61, (int(n),), generator=generator).tolist()
                 for n in torch.randint(1, 12, (64,), generator=generator)]
    return Recommender(model), histories


def test_hand_made_candidates_follow_the_formula():
    items, scores = torch.tensor([[1, 2, 3]]), torch.tensor([[3.0, 2.0, 1.0]])
    # lambda 0: relevance only
    assert mmr_rerank(items, scores, TABLE, 2, 0.0)[0].tolist() == [[1, 2]]
    # lambda 0.5, after item 1: item 2 gains 0.5 * 0.5 - 0.5 * 1 = -0.25, item 3 gains 0.5 * 0 - 0.5 * 0 = 0
    chosen, chosen_scores = mmr_rerank(items, scores, TABLE, 2, 0.5)
    assert chosen.tolist() == [[1, 3]]
    assert chosen_scores.tolist() == [[3.0, 1.0]]  # the model's own scores, in MMR order
    # lambda 0.2: item 2 gains 0.8 * 0.5 - 0.2 = 0.2 > item 3's 0: relevance still wins
    assert mmr_rerank(items, scores, TABLE, 2, 0.2)[0].tolist() == [[1, 2]]
    # The penalty is the max similarity to the chosen items, not the mean: after 1 and 3, item 2 (cos 1 to item 1,
    # 0 to item 3) loses to item 4 (cos 0.71 to both) at equal relevance; a mean would prefer 2 (0.5 < 0.71).
    items4, scores4 = torch.tensor([[1, 2, 4, 3]]), torch.tensor([[4.0, 2.0, 2.0, 1.0]])
    assert mmr_rerank(items4, scores4, TABLE, 3, 0.5)[0].tolist() == [[1, 3, 4]]


def test_lambda_zero_returns_exactly_the_models_top_k():
    recommender, histories = _tiny()
    k = 10
    candidates, scores = recommender.recommend(histories, candidate_count(k, recommender.n_items))
    top, top_scores = recommender.recommend(histories, k)
    items, item_scores = mmr_rerank(candidates, scores, unit_rows(recommender.model.item_weights()), k, 0.0)
    assert torch.equal(items, top)
    torch.testing.assert_close(item_scores, top_scores)


def test_diversity_rises_with_the_weight_and_lists_stay_valid():
    recommender, histories = _tiny()
    k = 10
    vectors = unit_rows(recommender.model.item_weights())
    candidates, scores = recommender.recommend(histories, candidate_count(k, recommender.n_items))
    ild = {}
    for weight in (0.0, 0.3, 0.7, 1.0):
        items, _ = mmr_rerank(candidates, scores, vectors, k, weight)
        ild[weight] = float(intra_list_diversity(items, vectors)[0].mean())
        for row, history in enumerate(histories):
            listed = items[row].tolist()
            assert len(set(listed)) == k  # never an item twice
            assert not set(listed) & set(history)  # never a seen item
            assert set(listed) <= set(candidates[row].tolist())  # only the model's candidates
            assert 0 not in listed
    assert ild[0.0] < ild[0.3] < ild[0.7] <= ild[1.0]


def test_rows_with_too_few_candidates_end_in_padding():
    items = torch.tensor([[1, 3, 0, 0], [2, 4, 3, 0]])
    scores = torch.tensor([[2.0, 1.0, float("-inf"), float("-inf")], [3.0, 2.0, 1.0, float("-inf")]])
    chosen, chosen_scores = mmr_rerank(items, scores, TABLE, 3, 0.5)
    assert chosen[0].tolist() == [1, 3, 0]
    assert chosen_scores[0, 2].item() == float("-inf")
    assert sorted(chosen[1].tolist()) == [2, 3, 4]


def test_bad_weights_and_cut_offs_are_refused():
    items, scores = torch.tensor([[1, 2]]), torch.tensor([[1.0, 0.5]])
    for weight in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="diversity weight must be between 0 and 1"):
            mmr_rerank(items, scores, TABLE, 1, weight)
    with pytest.raises(ValueError, match="k must be between 1 and the 2 candidates"):
        mmr_rerank(items, scores, TABLE, 3, 0.5)


def test_candidate_count_is_bounded_by_the_catalogue():
    assert candidate_count(10, 10_000) == CANDIDATES_PER_K * 10
    assert candidate_count(10, 30) == 30
    assert candidate_count(10, 10) == 10
