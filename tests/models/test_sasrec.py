import pytest
import torch

from pipeline.models.sasrec import PRESETS, SASRec, SASRecConfig, build_sasrec, count_parameters, load_model, save_model


def _model(**kw) -> SASRec:
    torch.manual_seed(0)
    return SASRec(SASRecConfig(n_items=50, d_model=16, n_layers=2, n_heads=2, max_len=12, dropout=0.0, **kw)).eval()


def test_shapes():
    model = _model()
    items = torch.randint(1, 51, (3, 7))
    assert model(items).shape == (3, 7, 16)
    scores = model.score(items, torch.tensor([7, 3, 1]))
    assert scores.shape == (3, 51)


def test_no_future_leakage():
    """Changing a later item never changes an earlier position's output."""
    model = _model()
    items = torch.randint(1, 51, (2, 10))
    before = model(items)
    changed = items.clone()
    changed[:, 6:] = torch.randint(1, 51, (2, 4))
    after = model(changed)
    torch.testing.assert_close(before[:, :6], after[:, :6])
    assert not torch.allclose(before[:, 6:], after[:, 6:])


def test_right_padding_does_not_change_the_user_representation():
    model = _model()
    seq = torch.tensor([[5, 9, 2, 7]])
    padded = torch.tensor([[5, 9, 2, 7, 0, 0, 0]])
    torch.testing.assert_close(model.score(seq, torch.tensor([4])), model.score(padded, torch.tensor([4])))


def test_input_and_output_embeddings_are_shared():
    model = _model()
    assert model.item_weights().data_ptr() == model.item_embedding.weight.data_ptr()
    assert model.item_embedding.weight[0].abs().sum() == 0  # padding row


def test_too_long_sequence_is_rejected():
    with pytest.raises(ValueError, match="max_len"):
        _model()(torch.ones(1, 13, dtype=torch.long))


def test_presets_span_small_to_large():
    small = count_parameters(build_sasrec(3000, "small"))
    assert 100_000 < small < 1_000_000  # a few hundred thousand
    # large: >= 100M parameters, embeddings included, at a 100k-item catalogue.
    cfg = SASRecConfig(n_items=100_000, **PRESETS["large"])
    d, layers = cfg.d_model, cfg.n_layers
    large = (cfg.n_items + 1) * d + cfg.max_len * d + layers * (12 * d * d + 13 * d) + 2 * d
    with torch.device("meta"):
        assert count_parameters(build_sasrec(100_000, "large")) == large
    assert large >= 100_000_000
    with torch.device("meta"):
        assert count_parameters(build_sasrec(1_000, "large")) >= 100_000_000  # even on a tiny catalogue


def test_save_and_load_round_trip(tmp_path):
    model = _model()
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    items = torch.randint(1, 51, (2, 5))
    torch.testing.assert_close(model(items), loaded(items))
