import pytest
import torch

from pipeline.models.codes import ItemCodes, assign_codes


def _table(rows: int = 301, dim: int = 32, seed: int = 0) -> torch.Tensor:
    """A table with row 0 the zero padding row and clustered real rows (as trained item tables are)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, dim, generator=generator)
    table = centres[torch.randint(0, 12, (rows,), generator=generator)] + 0.3 * torch.randn(rows, dim, generator=generator)
    table[0] = 0.0
    return table


@pytest.fixture(scope="module")
def codes() -> ItemCodes:
    return assign_codes(_table(), n_subspaces=4, codebook_size=32, seed=0)


def test_shapes_dtypes_and_bytes(codes):
    assert codes.codes.dtype == torch.uint8 and codes.codes.shape == (301, 4) and codes.codes.is_contiguous()
    assert codes.codebooks.dtype == torch.float32 and codes.codebooks.shape == (4, 32, 8)
    assert (codes.n_subspaces, codes.codebook_size, codes.dim) == (4, 32, 32)
    assert codes.nbytes == 301 * 4 + 4 * 32 * 8 * 4
    assert codes.reconstruct().shape == (301, 32)


def test_scores_equal_the_dense_reference_and_give_the_same_top_k(codes):
    hidden = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    dense = hidden @ codes.reconstruct().T
    scores = codes.scores(hidden)
    assert scores.shape == (16, 301) and scores.is_contiguous()
    torch.testing.assert_close(scores, dense, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.topk(scores, 10).indices, torch.topk(dense, 10).indices)


def test_lookup_tables_hold_each_sub_space_dot_product(codes):
    hidden = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    tables = codes.lookup_tables(hidden)
    assert tables.shape == (3, 4, 32) and tables.is_contiguous()
    expected = torch.stack([hidden[:, j * 8 : (j + 1) * 8] @ codes.codebooks[j].T for j in range(4)], dim=1)
    torch.testing.assert_close(tables, expected)
    # a row's score is the sum of its codes' entries
    row = 17
    by_hand = sum(tables[:, j, int(codes.codes[row, j])] for j in range(4))
    torch.testing.assert_close(codes.scores(hidden)[:, row], by_hand)


def test_reconstructing_some_rows_equals_indexing_the_table(codes):
    rows = torch.tensor([[3, 0, 7], [300, 1, 1]])
    assert codes.reconstruct(rows).shape == (2, 3, 32)
    assert torch.equal(codes.reconstruct(rows), codes.reconstruct()[rows])


def test_padding_row_is_exactly_zero_and_only_it_uses_the_reserved_code(codes):
    assert torch.equal(codes.codes[0], torch.zeros(4, dtype=torch.uint8))
    assert bool((codes.codes[1:] > 0).all())
    assert torch.equal(codes.reconstruct()[0], torch.zeros(32))
    assert torch.equal(codes.scores(torch.randn(5, 32))[:, 0], torch.zeros(5))


def test_assignment_is_deterministic_given_the_seed():
    table = _table()
    first, again = assign_codes(table, 4, 32, seed=3), assign_codes(table, 4, 32, seed=3)
    assert torch.equal(first.codes, again.codes) and torch.equal(first.codebooks, again.codebooks)
    other = assign_codes(table, 4, 32, seed=4)
    assert not torch.equal(first.codebooks, other.codebooks)


def test_reconstruction_error_shrinks_as_the_codebooks_grow():
    table = _table(rows=1001, dim=32)

    def error(size: int) -> float:
        rebuilt = assign_codes(table, 4, size, seed=0).reconstruct()
        return float((rebuilt[1:] - table[1:]).square().sum() / table[1:].square().sum())

    errors = [error(size) for size in (4, 16, 64, 256)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0]


def test_scores_are_differentiable_like_the_dense_product(codes):
    hidden = torch.randn(6, 32, generator=torch.Generator().manual_seed(5))
    weights = torch.randn(6, 301, generator=torch.Generator().manual_seed(6))
    gradients = []
    for use_codes in (True, False):
        codebooks = codes.codebooks.clone().requires_grad_(True)
        h = hidden.clone().requires_grad_(True)
        live = ItemCodes(codes.codes, codebooks)
        scores = live.scores(h) if use_codes else h @ live.reconstruct().T
        (scores * weights).sum().backward()
        gradients.append((codebooks.grad, h.grad))
    for from_codes, from_dense in zip(*gradients):
        torch.testing.assert_close(from_codes, from_dense, atol=1e-4, rtol=1e-4)


def test_state_dict_round_trips(codes):
    state = codes.state_dict("pq")
    assert set(state) == {"pq.codes", "pq.codebooks"}
    restored = ItemCodes.from_state_dict(state, "pq")
    assert torch.equal(restored.codes, codes.codes) and torch.equal(restored.codebooks, codes.codebooks)
    broken = {**state, "pq.codes": torch.full((301, 4), 40, dtype=torch.uint8)}
    with pytest.raises(ValueError, match="code 40 >= codebook size 32"):
        ItemCodes.from_state_dict(broken, "pq")


@pytest.mark.parametrize(
    ("rows", "dim", "n_subspaces", "codebook_size", "message"),
    [(50, 30, 4, 16, "n_subspaces=4 must be a positive divisor of the table's dimension 30"),
     (50, 32, 0, 16, "n_subspaces=0 must be a positive divisor"),
     (500, 32, 4, 257, "codebook_size must be between 2 and 256"),
     (50, 32, 4, 1, "codebook_size must be between 2 and 256"),
     (50, 32, 4, 51, "codebook_size=51 exceeds the table's 50 rows")],
)
def test_bad_arguments_are_rejected_with_the_reason(rows, dim, n_subspaces, codebook_size, message):
    with pytest.raises(ValueError, match=message):
        assign_codes(torch.randn(rows, dim), n_subspaces, codebook_size, seed=0)


def test_codes_and_codebooks_must_fit_together():
    with pytest.raises(ValueError, match="2-D table"):
        assign_codes(torch.randn(10), 1, 2, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        ItemCodes(torch.zeros(5, 2, dtype=torch.int64), torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match="codes have 2 sub-spaces, codebooks 3"):
        ItemCodes(torch.zeros(5, 2, dtype=torch.uint8), torch.zeros(3, 4, 3))
    with pytest.raises(ValueError, match="exceeds 256"):
        ItemCodes(torch.zeros(5, 2, dtype=torch.uint8), torch.zeros(2, 300, 3))
    with pytest.raises(ValueError, match=r"hidden must be \(batch, 6\)"):
        ItemCodes(torch.zeros(5, 2, dtype=torch.uint8), torch.zeros(2, 4, 3)).scores(torch.zeros(2, 5))


def test_a_codebook_as_large_as_the_table_reconstructs_it_exactly():
    table = _table(rows=40, dim=8)
    rebuilt = assign_codes(table, 2, 40, seed=0).reconstruct()  # one centroid per real row
    torch.testing.assert_close(rebuilt, table, atol=1e-5, rtol=0)
