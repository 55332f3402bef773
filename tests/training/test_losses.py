"""The next-item loss, stated once, in its three shapes: teacher module, fine-tune function, plain function of any loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.sequences import Batch
from pipeline.models.sasrec import SASRec, SASRecConfig
from pipeline.training.losses import (
    NextItemLoss,
    module_loss,
    next_item_loss,
    plain_next_item_loss,
    sampling_log_probabilities,
    summed_next_item_loss,
)


def _model_and_batch(n_items=40, seed=0):
    torch.manual_seed(seed)
    model = SASRec(SASRecConfig(n_items=n_items, d_model=16, n_layers=1, n_heads=2, max_len=8, dropout=0.0)).double()
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(1, n_items + 1, (5, 8), generator=g)
    targets = torch.randint(1, n_items + 1, (5, 8), generator=g)
    inputs[0, 5:] = 0  # right padding: no target there
    targets[0, 5:] = 0
    lengths = (inputs != 0).sum(1)
    return model, Batch(rows=np.arange(5), inputs=inputs, lengths=lengths, targets=targets, users=torch.arange(5))


@pytest.mark.parametrize("loss", ["full_softmax", "chunked_softmax"])
def test_exact_losses_agree_in_every_shape(loss):
    model, batch = _model_and_batch()
    reference, tokens = next_item_loss(model, batch)
    as_module, module_tokens = module_loss(NextItemLoss(model, loss, 0, None, block_logits=3 * 40), batch)
    as_function, function_tokens = plain_next_item_loss(loss, 0, None, block_logits=3 * 40)(model, batch)
    assert tokens == module_tokens == function_tokens == int((batch.targets != 0).sum()) == 37
    torch.testing.assert_close(as_module, reference, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(as_function, reference, rtol=1e-12, atol=1e-10)


def test_sampled_softmax_is_the_same_estimate_in_both_shapes_and_has_gradients():
    model, batch = _model_and_batch()
    counts = np.arange(41, dtype=np.int64)
    logq = sampling_log_probabilities(counts).double()
    assert logq[0] == float("-inf") and torch.isclose(logq[1:].exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.manual_seed(3)
    as_module, _ = module_loss(NextItemLoss(model, "sampled_softmax", 16, logq, block_logits=1), batch)
    torch.manual_seed(3)
    as_function, _ = plain_next_item_loss("sampled_softmax", 16, logq, block_logits=0)(model, batch)
    torch.testing.assert_close(as_function, as_module)
    full, _ = next_item_loss(model, batch)
    assert 0 < float(as_function.detach()) < float(full.detach())  # 16 negatives: a smaller partition than 40 items
    as_function.backward()
    assert model.item_embedding.weight.grad.abs().sum() > 0


def test_unknown_losses_are_named():
    model, batch = _model_and_batch()
    hidden = model(batch.inputs)[batch.targets != 0]
    with pytest.raises(ValueError, match="unknown loss 'bpr'"):
        summed_next_item_loss(hidden, model.item_weights(), batch.targets[batch.targets != 0], "bpr", 1, None, 8)
