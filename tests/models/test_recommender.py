import pytest
import torch

from pipeline.data.sequences import evaluation_batches, load_sequences
from pipeline.evaluation.metrics import evaluate
from pipeline.models.recommender import Recommender
from pipeline.models.sasrec import SASRec, SASRecConfig, save_model
from tests.helpers import build_features


def _model(n_items: int = 30) -> SASRec:
    torch.manual_seed(0)
    return SASRec(SASRecConfig(n_items=n_items, d_model=16, n_layers=1, n_heads=2, max_len=8, dropout=0.0))


def test_recommend_excludes_seen_and_padding_and_is_sorted(tmp_path):
    save_model(_model(), tmp_path)
    rec = Recommender.load(tmp_path)
    histories = [[1, 2, 3], [5], list(range(1, 21))]
    items, scores = rec.recommend(histories, k=10)
    assert items.shape == (3, 10)
    for row, history in enumerate(histories):
        assert not set(items[row].tolist()) & set(history)
        assert 0 not in items[row].tolist()
        assert torch.all(scores[row][:-1] >= scores[row][1:])


def test_long_histories_use_the_last_max_len_items():
    rec = Recommender(_model())
    long = list(range(1, 21))
    torch.testing.assert_close(rec.scores([long]), rec.scores([long[-8:]]))


def test_bad_requests_raise_clear_errors():
    rec = Recommender(_model())
    with pytest.raises(ValueError, match="k must be between"):
        rec.recommend([[1]], k=0)
    with pytest.raises(ValueError, match="k must be between"):
        rec.recommend([[1]], k=31)
    with pytest.raises(ValueError, match="at least one item"):
        rec.recommend([[1], []])
    with pytest.raises(ValueError, match="outside 1..30"):
        rec.recommend([[0, 3]])
    with pytest.raises(ValueError, match="empty"):
        rec.recommend([])


def test_recommender_agrees_with_the_evaluator(tmp_path):
    """HR@10 from Recommender's top-10 lists equals the evaluator's full-ranking HR@10."""
    layout = build_features(tmp_path)
    data = load_sequences(layout.features_dir)
    model = _model(data.n_items)
    rec = Recommender(model)
    expected = evaluate(lambda b: model.score(b.inputs, b.lengths), data, "test", ks=[10], max_len=8,
                        sampled_strategies=(), progress=False)
    hits = users = 0
    for batch in evaluation_batches(data, "test", 256, 10_000):
        histories = [h[: int(n)].tolist() for h, n in zip(batch.inputs, batch.lengths)]
        items, _ = rec.recommend(histories, k=10)
        hits += int((items == batch.targets.view(-1, 1)).any(1).sum())
        users += len(histories)
    # The evaluator breaks exact score ties at random; an untrained model has none at the top.
    assert hits / users == pytest.approx(expected["full/HR@10"], abs=1e-9)


def test_large_tensors_move_to_numpy_memory_unchanged(monkeypatch):
    """Recommender re-homes big tables (numpy asks for huge pages); values, and so results, are unchanged."""
    import pipeline.models.recommender as recommender

    monkeypatch.setattr(recommender, "HUGE_PAGE_MIN_BYTES", 1024)  # the 31 x 16 item table is 1,984 bytes
    model = _model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    pointer = model.item_embedding.weight.data_ptr()
    rec = Recommender(model)
    assert model.item_embedding.weight.data_ptr() != pointer  # moved
    assert isinstance(model.item_embedding.weight, torch.nn.Parameter)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    items, _ = rec.recommend([[1, 2, 3]], k=5)
    assert items.shape == (1, 5)
