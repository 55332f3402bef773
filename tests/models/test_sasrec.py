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


@pytest.mark.parametrize("n_layers", [1, 2])
def test_last_position_shortcut_equals_the_full_computation(n_layers):
    """last_hidden (final block at the last real position only) = every position computed, then gathered."""
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=50, d_model=16, n_layers=n_layers, n_heads=2, max_len=12, dropout=0.0)).eval()
    lengths = torch.tensor([12, 1, 5, 9])
    items = torch.randint(1, 51, (4, 12))
    items[torch.arange(12) >= lengths.view(-1, 1)] = 0  # right-padded, as Recommender builds them
    with torch.no_grad():
        full = model.hidden(items)[torch.arange(4), lengths - 1]
        shortcut = model.last_hidden(items, lengths)
    torch.testing.assert_close(shortcut, full, atol=1e-5, rtol=1e-5)
    model.train()  # training keeps the full computation (dropout off here, so the same values)
    torch.testing.assert_close(model.last_hidden(items, lengths), full, atol=1e-5, rtol=1e-5)


def test_an_attached_encoder_computes_the_user_vector_at_inference_only():
    model = _model()
    calls = []

    def encoder(embedded, lengths):
        calls.append(embedded.shape)
        return torch.zeros(embedded.shape[0], 16)

    model.encoder = encoder
    items, lengths = torch.randint(1, 51, (3, 7)), torch.tensor([7, 3, 1])
    assert torch.equal(model.last_hidden(items, lengths), torch.zeros(3, 16))
    assert calls == [(3, 7, 16)]
    model.train()
    assert not torch.equal(model.last_hidden(items, lengths), torch.zeros(3, 16))
    assert len(calls) == 1


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
