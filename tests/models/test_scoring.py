"""Every scorer's top-K equals the dense top-K on the same weights (numba kernels and torch loops alike)."""

import numpy as np
import pytest
import torch

from pipeline.models import scoring
from pipeline.models.quantize import quantize_rowwise
from pipeline.models.recommender import Recommender
from pipeline.models.sasrec import SASRec, SASRecConfig
from pipeline.models.scoring import Exclusion, dense_top_k, pq_scores, pq_top_k, rowwise_int8_top_k
from pipeline.models.variants import QuantizedTableSASRec

BACKENDS = ["numba", "torch"]
TOLERANCE = 1e-4  # fp32 against the fp64 reference: scores closer than this count as ties


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "torch":  # the fallback CUDA tensors take, here on CPU
        monkeypatch.setattr(scoring, "kernels_for", lambda tensor: None)
    return request.param


def _reference(scores: torch.Tensor, exclusion: Exclusion) -> torch.Tensor:
    """fp64 scores with padding and excluded rows at -inf."""
    scores = scores.double().clone()
    scores[:, 0] = float("-inf")
    users, rows = exclusion.pairs(scores.device)
    scores[users, rows] = float("-inf")
    return scores


def assert_exact_top_k(indices: torch.Tensor, scores: torch.Tensor, reference: torch.Tensor, k: int) -> None:
    """The returned rows are the reference top-k, best first; only rows within TOLERANCE of each other may swap."""
    assert indices.shape == scores.shape == (reference.shape[0], k)
    assert indices.dtype == torch.int64 and scores.dtype == torch.float32
    ref = torch.topk(reference, k, dim=1)
    for user in range(reference.shape[0]):
        eligible = min(k, int(torch.isfinite(reference[user]).sum()))
        got = indices[user, :eligible]
        assert len(set(got.tolist())) == eligible, "a row returned twice"
        exact = reference[user, got]
        assert torch.isfinite(exact).all(), "padding or an excluded row was returned"
        torch.testing.assert_close(scores[user, :eligible].double(), exact, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(exact, ref.values[user, :eligible], atol=TOLERANCE, rtol=0)
        gaps = ref.values[user, :eligible].diff().abs()
        separated = torch.ones(eligible, dtype=torch.bool)
        separated[1:] &= gaps > TOLERANCE
        separated[:-1] &= gaps > TOLERANCE
        assert torch.equal(got[separated], ref.indices[user, :eligible][separated])
        assert (indices[user, eligible:] == 0).all() and (scores[user, eligible:] == float("-inf")).all()


def _table(n_rows: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    table = torch.randn(n_rows, dim, generator=generator)
    table[0] = 0.0
    return table


def _exclusions(n_users: int, n_rows: int, best: torch.Tensor, seed: int) -> Exclusion:
    """Random seen rows (with duplicates) plus each user's true best row."""
    rng = np.random.default_rng(seed)
    return Exclusion.from_lists([[*rng.integers(1, n_rows, size=rng.integers(0, 60)).tolist(), int(best[user]), int(best[user])]
                                 for user in range(n_users)])


@pytest.mark.parametrize(("n_users", "k", "rows_per_chunk"), [(1, 10, None), (3, 1, 1000), (17, 100, 4096), (2, 1000, 2500)])
def test_dense_top_k_equals_the_reference(backend, n_users, k, rows_per_chunk):
    table = _table(10_001, 16, seed=n_users)
    hidden = torch.randn(n_users, 16, generator=torch.Generator().manual_seed(1))
    full = hidden.double() @ table.double().T
    for exclusion in (Exclusion.none(n_users), _exclusions(n_users, 10_001, _reference(full, Exclusion.none(n_users)).argmax(1), 2)):
        indices, scores = dense_top_k(hidden, table, k, exclusion, rows_per_chunk=rows_per_chunk)
        assert_exact_top_k(indices, scores, _reference(full, exclusion), k)


def test_excluding_the_best_rows_and_almost_everything(backend):
    table = _table(50, 8, seed=3)
    hidden = torch.randn(2, 8, generator=torch.Generator().manual_seed(4))
    full = hidden.double() @ table.double().T
    best = _reference(full, Exclusion.none(2)).argmax(1)
    # user 0 may only get rows 7 and 9; user 1 loses its best row (given as a list of lists, as Recommender does)
    exclude = [[row for row in range(1, 50) if row not in (7, 9)], [int(best[1])]]
    indices, scores = dense_top_k(hidden, table, 5, exclude, rows_per_chunk=16)
    assert set(indices[0, :2].tolist()) == {7, 9} and indices[0, 2:].tolist() == [0, 0, 0]
    assert int(best[1]) not in indices[1].tolist()
    assert_exact_top_k(indices, scores, _reference(full, Exclusion.from_lists(exclude)), 5)


@pytest.mark.parametrize(("n_users", "k"), [(1, 10), (4, 50), (scoring.INT8_FUSED_MAX_USERS + 3, 1000)])
def test_int8_top_k_equals_the_dense_top_k_on_the_dequantized_table(backend, n_users, k):
    quantized = quantize_rowwise(_table(8_193, 32, seed=5) * 0.1 + 0.05, bits=8)
    hidden = torch.randn(n_users, 32, generator=torch.Generator().manual_seed(6))
    full = hidden.double() @ quantized.dequantize().double().T
    exclusion = _exclusions(n_users, 8_193, _reference(full, Exclusion.none(n_users)).argmax(1), 7)
    indices, scores = rowwise_int8_top_k(hidden, quantized, k, exclusion, rows_per_chunk=3000)
    assert_exact_top_k(indices, scores, _reference(full, exclusion), k)
    dense_indices, _ = dense_top_k(hidden, quantized.dequantize(), k, exclusion)
    assert (indices == dense_indices).float().mean() > 0.99  # the same rows as the dense scorer, near ties aside


def test_int8_scorer_rejects_int4_tables():
    with pytest.raises(ValueError, match="8-bit"):
        rowwise_int8_top_k(torch.randn(1, 8), quantize_rowwise(torch.randn(20, 8), bits=4), 3)


def _pq(n_rows: int, n_sub: int, n_codes: int, n_users: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, n_codes, (n_rows, n_sub), dtype=torch.uint8, generator=generator)
    return torch.randn(n_users, n_sub, n_codes, generator=generator), codes


@pytest.mark.parametrize(("n_users", "k", "n_sub"),
                         [(1, 10, 8), (scoring.PQ_PER_USER_MAX_USERS, 100, 4),
                          (scoring.PQ_PER_USER_MAX_USERS + 1, 10, 8), (scoring.PQ_USER_TILE + 6, 1000, 8)])
def test_pq_top_k_equals_the_reference_sum(backend, n_users, k, n_sub):
    lut, codes = _pq(20_000, n_sub, 256, n_users, seed=n_users)
    full = pq_scores(lut.double(), codes)
    exclusion = _exclusions(n_users, 20_000, _reference(full, Exclusion.none(n_users)).argmax(1), 8)
    indices, scores = pq_top_k(lut, codes, k, exclusion, rows_per_chunk=7000)
    assert_exact_top_k(indices, scores, _reference(full, exclusion), k)


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])  # fall back to a scan at once / as shipped / never
@pytest.mark.parametrize(("n_users", "k", "structured"), [(1, 10, True), (2, 1000, True), (1, 10, False), (2, 50, False)])
def test_pruned_pq_top_k_equals_the_reference_sum(monkeypatch, share, n_users, k, structured):
    lut, codes = _pq(20_000, 8, 256, n_users, seed=13)
    if structured:  # peaked tables, as trained ones: a few codes score far above the rest, so pruning stops early
        lut = lut * torch.rand(1, 8, 256, generator=torch.Generator().manual_seed(14)) ** 8 * 5
    full = pq_scores(lut.double(), codes)
    exclusion = _exclusions(n_users, 20_000, _reference(full, Exclusion.none(n_users)).argmax(1), 15)
    monkeypatch.setattr(scoring, "PQ_PRUNED_MAX_SCORED_SHARE", share)
    postings = scoring.pq_postings(codes, n_blocks=3)
    indices, scores = pq_top_k(lut, codes, k, exclusion, postings=postings)
    assert_exact_top_k(indices, scores, _reference(full, exclusion), k)


def test_postings_list_every_row_once_per_sub_space():
    _, codes = _pq(1_001, 4, 16, 1, seed=16)
    postings = scoring.pq_postings(codes, n_codes=16, n_blocks=2)
    for j in range(4):
        listed = []
        for block in range(2):
            for code in range(16):
                lo, hi = postings.offsets[block, j, code], postings.offsets[block, j, code + 1]
                rows = postings.rows[block, j, lo:hi].tolist()
                assert all(int(codes[row, j]) == code for row in rows)
                listed += rows
        assert sorted(listed) == list(range(1, 1_001))  # row 0 (padding) is never listed


def test_pq_reference_sum_is_the_reconstructed_table_product():
    """LUT[b, j, c] = h_j . codebook_j[c], so summing the LUT is scoring the reconstructed table."""
    generator = torch.Generator().manual_seed(9)
    codebooks, codes = torch.randn(4, 16, 3, generator=generator), torch.randint(0, 16, (300, 4), dtype=torch.uint8, generator=generator)
    hidden = torch.randn(2, 12, generator=generator)
    lut = torch.einsum("bjs,jks->bjk", hidden.view(2, 4, 3), codebooks)
    reconstructed = torch.cat([codebooks[j][codes[:, j].long()] for j in range(4)], dim=1)
    torch.testing.assert_close(pq_scores(lut, codes), hidden @ reconstructed.T, atol=1e-5, rtol=1e-5)


def test_numba_kernels_equal_the_torch_loops(monkeypatch):
    lut, codes = _pq(30_000, 8, 256, 9, seed=10)
    table = _table(30_000, 24, seed=11)
    hidden = torch.randn(9, 24, generator=torch.Generator().manual_seed(12))
    quantized = quantize_rowwise(table, bits=8)
    calls = {"pq": lambda: pq_top_k(lut, codes, 20), "dense": lambda: dense_top_k(hidden, table, 20),
             "int8": lambda: rowwise_int8_top_k(hidden[:3], quantized, 20)}
    with_numba = {name: call() for name, call in calls.items()}
    monkeypatch.setattr(scoring, "kernels_for", lambda tensor: None)
    for name, call in calls.items():
        indices, scores = call()
        torch.testing.assert_close(with_numba[name][1], scores, atol=TOLERANCE, rtol=0)
        assert (with_numba[name][0] == indices).float().mean() > 0.99, name


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="k must be between"):
        dense_top_k(torch.randn(1, 4), torch.randn(10, 4), 10)
    with pytest.raises(ValueError, match="for 2 users"):
        dense_top_k(torch.randn(1, 4), torch.randn(10, 4), 3, [[1], [2]])
    with pytest.raises(ValueError, match="disagree"):
        pq_top_k(torch.randn(1, 4, 16), torch.zeros(10, 8, dtype=torch.uint8), 3)


def _old_recommend(rec: Recommender, histories: list[list[int]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Recommender.recommend as it was: full scores, padding and seen items masked, torch.topk."""
    scores = rec.scores(histories).clone()
    for row, history in enumerate(histories):
        scores[row, history] = float("-inf")
    top = torch.topk(scores, k, dim=1)
    return top.indices, top.values


@pytest.mark.parametrize("quantized", [False, True])
def test_recommender_results_are_unchanged(quantized):
    torch.manual_seed(0)
    cfg = SASRecConfig(n_items=3000, d_model=16, n_layers=1, n_heads=2, max_len=8, dropout=0.0)
    model = SASRec(cfg)
    if quantized:
        table = quantize_rowwise(model.item_embedding.weight, bits=8)
        state = {k: v for k, v in model.state_dict().items() if k != "item_embedding.weight"}
        model = QuantizedTableSASRec(cfg, table)
        model.load_state_dict(state)
        assert not hasattr(model, "dense_table")  # scored from the codes
    rec = Recommender(model)
    rng = np.random.default_rng(0)
    histories = [rng.integers(1, 3001, size=n).tolist() for n in (1, 5, 30, 8)]
    for k in (1, 10, 500):
        items, scores = rec.recommend(histories, k=k)
        old_items, old_scores = _old_recommend(rec, histories, k)
        torch.testing.assert_close(scores, old_scores, atol=1e-5, rtol=0)
        assert (items == old_items).float().mean() > 0.99


@pytest.mark.parametrize("n_users", [1, 5, 64])
def test_target_rank_counts_equal_the_masked_count(backend, n_users):
    generator = torch.Generator().manual_seed(n_users)
    n_rows = 3001
    # Scores on a coarse grid: many exact ties with the target.
    scores = torch.randint(-20, 20, (n_users, n_rows), generator=generator).float() / 4
    targets = torch.randint(1, n_rows, (n_users,), generator=generator)
    exclusion = _exclusions(n_users, n_rows, targets.roll(1), seed=n_users)  # someone else's target is excluded
    greater, ties = scoring.target_rank_counts(scores, targets, exclusion)
    reference = _reference(scores, exclusion)
    reference[torch.arange(n_users), targets] = float("-inf")  # the target does not compete with itself
    target_scores = scores.double().gather(1, targets.view(-1, 1))
    assert greater.tolist() == (reference > target_scores).sum(1).tolist()
    assert ties.tolist() == (reference == target_scores).sum(1).tolist()
    assert int(ties.sum()) > 0


def test_excluded_rows_and_padding_never_count(backend):
    scores = torch.tensor([[0.0, 3.0, 2.0, 1.0, 2.0]])
    exclusion = Exclusion.from_lists([[1]])
    greater, ties = scoring.target_rank_counts(scores, torch.tensor([2]), exclusion)
    assert (greater.item(), ties.item()) == (0, 1)  # row 1 excluded, row 4 ties, padding row 0 never counts
    greater, ties = scoring.target_rank_counts(scores, torch.tensor([3]), Exclusion.none(1))
    assert (greater.item(), ties.item()) == (3, 0)
