"""`evaluate` (numba ranking pass, top-K kernels, rejection sampling of negatives) against a plain
per-user reference on the same scores: ranks and every metric exactly equal."""

import math

import numpy as np
import pytest
import torch

from pipeline.data.sequences import SequenceData, evaluation_batches, evaluation_rows
from pipeline.evaluation import metrics
from pipeline.evaluation.metrics import evaluate, sample_negatives, validation_sample
from pipeline.models import scoring
from pipeline.models.scoring import Exclusion

N_ITEMS = 300


def _data(seed: int = 0, n_users: int = 700) -> SequenceData:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 40, size=n_users)
    # Zipf-like popularity, repeats allowed (a re-consumed target stays rankable)
    popularity = 1.0 / np.arange(1, N_ITEMS + 1) ** 0.8
    items = rng.choice(np.arange(1, N_ITEMS + 1), size=int(lengths.sum()), p=popularity / popularity.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return SequenceData(users=np.arange(1, n_users + 1), offsets=offsets, items=items, n_train=lengths - 2,
                        n_valid=np.ones(n_users, np.int64), n_test=np.ones(n_users, np.int64), n_items=N_ITEMS,
                        n_user_index=n_users)


def _scorer(ties: bool):
    """Scores by the last item of the history, looked up in a fixed matrix (so the same whatever the
    batch and its padding); on a coarse grid when `ties`: many exact ties."""
    table = torch.randn(N_ITEMS + 1, N_ITEMS + 1, generator=torch.Generator().manual_seed(1))
    table = (table * 2).round() / 2 if ties else table

    def score(batch):
        return table[batch.inputs[torch.arange(len(batch.rows)), batch.lengths - 1]]
    return score


def _reference(score_fn, data, split, ks, batch_size, sampled_negatives, strategies, seed):
    """The protocol written out per user: rank = items above the target + a random place among the
    tied ones, over items that are not padding, not seen before the split (the target excepted);
    the sampled protocols rank it among `sample_negatives` of the users in order of history length,
    in batches, as evaluate scores them. Metric sums batch by batch in user order, as evaluate's."""
    generator = torch.Generator().manual_seed(seed)
    sampled_generator = torch.Generator().manual_seed(seed + 1)
    counts = torch.from_numpy(data.train_item_counts()).double() + 1.0
    counts[0] = 0.0
    prefix = data.prefix_length(split)
    rows = np.flatnonzero((data.n_valid if split == "valid" else data.n_test) > 0)
    one = lambda row: next(iter(evaluation_batches(data, split, 1, 10_000, np.array([row]))))  # noqa: E731
    seen, target, scores = {}, {}, {}
    for row in rows:
        batch = one(row)
        target[row] = int(batch.targets[0])
        history = data.items[data.offsets[row]: data.offsets[row] + prefix[row]].tolist()
        seen[row] = sorted(set(history) - {target[row]})
        scores[row] = score_fn(batch)[0].double()

    def counts_against(row, items):
        values = [float(scores[row][i]) for i in items]
        return sum(v > float(scores[row][target[row]]) for v in values), sum(v == float(scores[row][target[row]]) for v in values)

    full = {row: counts_against(row, [i for i in range(1, N_ITEMS + 1) if i not in seen[row] and i != target[row]])
            for row in rows}
    sampled = {strategy: {} for strategy in strategies}
    by_length = rows[np.argsort(prefix[rows], kind="stable")]
    for start in range(0, len(rows), batch_size):
        chunk = by_length[start:start + batch_size]
        exclusion = Exclusion.from_lists([seen[row] for row in chunk])
        targets = torch.tensor([target[row] for row in chunk])
        for strategy in strategies:
            negatives = sample_negatives(exclusion, targets, N_ITEMS, sampled_negatives, sampled_generator,
                                         counts if strategy == "popularity" else None)
            for row, drawn in zip(chunk, negatives.tolist()):
                sampled[strategy][row] = counts_against(row, drawn)
    out, covered = {}, {k: set() for k in ks}

    def add(name, values, cut_offs):
        for metric, per_user in metrics.metrics_from_ranks(torch.tensor(values), cut_offs).items():
            out[f"{name}/{metric}"] = out.get(f"{name}/{metric}", 0.0) + float(per_user.sum())

    for start in range(0, len(rows), batch_size):
        part = rows[start:start + batch_size]
        u = torch.rand(len(part), generator=generator).tolist()
        add("full", [full[row][0] + math.floor(x * (full[row][1] + 1)) for row, x in zip(part, u)], ks)
        for strategy in strategies:
            u = torch.rand(len(part), generator=sampled_generator).tolist()
            add(f"sampled_{strategy}_{sampled_negatives}",
                [sampled[strategy][row][0] + math.floor(x * (sampled[strategy][row][1] + 1)) for row, x in zip(part, u)],
                [k for k in ks if k <= sampled_negatives])
        for row in part:
            ordered = sorted([i for i in range(1, N_ITEMS + 1) if i not in seen[row]], key=lambda i: -float(scores[row][i]))
            for k in ks:
                covered[k].update(ordered[:k])
    out = {name: total / len(rows) for name, total in out.items()}
    for k in ks:
        out[f"full/Coverage@{k}"] = len(covered[k]) / N_ITEMS
    out["users"] = float(len(rows))
    return out


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("split", ["valid", "test"])
def test_evaluate_equals_the_per_user_reference(monkeypatch, backend, ties, split):
    if backend == "torch":
        monkeypatch.setattr(scoring, "kernels_for", lambda tensor: None)
        monkeypatch.setattr(metrics, "kernels_for", lambda tensor: None)
    data = _data()
    ks = (1, 5, 10) if ties else (10, 20)  # tied scores: top-k lists of tied items may differ, coverage at k=1..10 only
    kwargs = dict(split=split, ks=ks, batch_size=128, sampled_negatives=50, seed=3)
    got = evaluate(_scorer(ties), data, max_len=10_000, sampled_strategies=("uniform", "popularity"), progress=False,
                   **kwargs)
    want = _reference(_scorer(ties), data, strategies=("uniform", "popularity"), **kwargs)
    if ties:  # which of several tied items fill the last slots of a top-k list is not defined
        got = {k: v for k, v in got.items() if "Coverage" not in k}
        want = {k: v for k, v in want.items() if "Coverage" not in k}
    assert got == want


def test_full_ranking_metrics_do_not_depend_on_the_sampled_protocols():
    data = _data(1)
    with_sampled = evaluate(_scorer(True), data, "test", ks=(10,), sampled_strategies=("uniform", "popularity"),
                            progress=False, seed=5)
    without = evaluate(_scorer(True), data, "test", ks=(10,), sampled_strategies=(), progress=False, seed=5)
    assert {k: v for k, v in with_sampled.items() if k.startswith("full/")} == {k: v for k, v in without.items() if k.startswith("full/")}


def _exclusion(rng, n_users):
    return Exclusion.from_lists([rng.integers(1, N_ITEMS + 1, size=rng.integers(0, 80)).tolist() for _ in range(n_users)])


def test_sampled_negatives_are_distinct_allowed_items_and_the_kernel_equals_python(monkeypatch):
    rng = np.random.default_rng(0)
    targets = torch.from_numpy(rng.integers(1, N_ITEMS + 1, size=40))
    exclusion = _exclusion(rng, 40)
    weights = torch.from_numpy(1.0 / np.arange(1, N_ITEMS + 2) ** 1.2)
    weights[0] = 0.0
    for w in (None, weights):
        fast = sample_negatives(exclusion, targets, N_ITEMS, 100, torch.Generator().manual_seed(2), w)
        with monkeypatch.context() as patch:
            patch.setattr(metrics, "kernels_for", lambda tensor: None)
            slow = sample_negatives(exclusion, targets, N_ITEMS, 100, torch.Generator().manual_seed(2), w)
        assert torch.equal(fast, slow) and fast.shape == (40, 100)
        for b in range(40):
            row = fast[b].tolist()
            excluded = set(exclusion.rows[exclusion.start[b]:exclusion.start[b + 1]].tolist())
            assert len(set(row)) == 100 and 0 not in row and int(targets[b]) not in row and not excluded & set(row)


def test_sampled_negatives_are_capped_by_the_fewest_allowed_items():
    # 6 items; user 0 has seen 1-4 (target 5): only item 6 is left to draw, so everybody gets one negative
    exclusion = Exclusion.from_lists([[1, 2, 3, 4], [2]])
    negatives = sample_negatives(exclusion, torch.tensor([5, 1]), 6, 100, torch.Generator().manual_seed(0))
    assert negatives.shape == (2, 1) and negatives[0, 0] == 6 and negatives[1, 0] not in (1, 2)


@pytest.mark.parametrize("weighted", [False, True])
def test_sampled_negatives_follow_the_protocol_distribution(weighted):
    """Inclusion frequencies of sampling without replacement: uniform over the allowed items, or
    drawn in proportion to the weights (checked with one negative, where the inclusion probability
    is the weight's share of the allowed items' weights)."""
    n_users, n_items = 20_000, 20
    exclusion = Exclusion.from_lists([[1, 2]] * n_users)
    targets = torch.full((n_users,), 3)
    weights = torch.arange(n_items + 1, dtype=torch.float64) if weighted else None
    negatives = sample_negatives(exclusion, targets, n_items, 1, torch.Generator().manual_seed(0), weights)
    frequency = np.bincount(negatives.view(-1).numpy(), minlength=n_items + 1)[4:] / n_users
    share = np.arange(4, n_items + 1) / np.arange(4, n_items + 1).sum() if weighted else np.full(n_items - 3, 1 / (n_items - 3))
    assert np.abs(frequency - share).max() < 0.01


def test_a_validation_sample_is_fixed_by_the_seed_and_evaluated_alone():
    data = _data(2)
    sample = validation_sample(data, 100, seed=7)
    assert np.array_equal(sample, validation_sample(data, 100, seed=7)) and len(set(sample.tolist())) == 100
    assert not np.array_equal(sample, validation_sample(data, 100, seed=8))
    assert set(sample.tolist()) <= set(evaluation_rows(data, "valid").tolist())
    assert validation_sample(data, None, seed=7) is None and validation_sample(data, 10**6, seed=7) is None
    on_sample = evaluate(_scorer(False), data, "valid", ks=(10,), sampled_strategies=(), progress=False, rows=sample)
    alone = evaluate(_scorer(False), _only(data, sample), "valid", ks=(10,), sampled_strategies=(), progress=False)
    assert on_sample == alone and on_sample["users"] == 100


def test_without_coverage_no_lists_are_taken_and_the_ranks_are_the_same():
    data = _data(3)
    full = evaluate(_scorer(True), data, "valid", ks=(10,), sampled_strategies=(), progress=False)
    fast = evaluate(_scorer(True), data, "valid", ks=(10,), sampled_strategies=(), progress=False, coverage=False)
    assert "full/Coverage@10" not in fast and fast == {k: v for k, v in full.items() if k != "full/Coverage@10"}


def _only(data: SequenceData, rows: np.ndarray) -> SequenceData:
    lengths = data.offsets[rows + 1] - data.offsets[rows]
    items = np.concatenate([data.items[data.offsets[r]:data.offsets[r + 1]] for r in rows])
    return SequenceData(data.users[rows], np.concatenate([[0], np.cumsum(lengths)]), items, data.n_train[rows],
                        data.n_valid[rows], data.n_test[rows], data.n_items, data.n_user_index)
