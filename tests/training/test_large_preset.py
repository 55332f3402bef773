"""The `large` preset (d_model 1024, 8 blocks, 16 heads; over 100M parameters) trains on CPU.

A few optimizer steps of the teacher's engine step (its settings and loss, as pipeline/training/train.py
builds them) with a small batch and short sequences: the loss stays finite and every weight that got a
gradient moved. Slow: about 2 GB of weights, gradients and AdamW moments, seconds per step on 2 cores.
"""

import math

import pytest
import torch

from pipeline.core.config import params_from_dict
from pipeline.data.sequences import load_sequences, training_batches
from pipeline.models.sasrec import SASRec, count_parameters
from pipeline.training.engine import Engine
from pipeline.training.losses import module_loss
from pipeline.training.train import build_model_config, engine_settings, teacher_loss
from tests.helpers import build_features

STEPS, BATCH, SEQ_LEN = 3, 4, 16


@pytest.mark.slow
def test_the_large_preset_takes_optimizer_steps_on_cpu(tmp_path):
    cpu = torch.device("cpu")
    data = load_sequences(build_features(tmp_path / "features").features_dir)
    cfg = params_from_dict({}, ["train.preset=large", f"train.batch_size={BATCH}", "train.device=cpu",
                                "tracking.enabled=false"]).train
    torch.manual_seed(0)
    model = SASRec(build_model_config(cfg, data.n_items))
    assert model.cfg.d_model == 1024 and model.cfg.n_layers == 8 and count_parameters(model) > 100_000_000
    loss_module = teacher_loss(cfg, model, data, cpu)
    engine = Engine(model, data, module_loss, engine_settings(cfg, 0, cpu, tmp_path / "unused.pt", False, 512), cpu,
                    loss_module=loss_module)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    batches = training_batches(data, BATCH, SEQ_LEN, seed=0, epoch=0)
    losses, width = [], 0
    for _ in range(STEPS):
        batch = next(batches)
        width = max(width, batch.inputs.shape[1])
        loss_sum, tokens = engine.train_step(batch)
        assert tokens > 0
        losses.append(float(loss_sum.detach()) / tokens)
    assert all(math.isfinite(v) for v in losses), losses

    for name, p in model.named_parameters():
        moved = (p.detach() != before[name]).flatten(1) if p.dim() > 1 else (p.detach() != before[name]).view(1, -1)
        assert torch.isfinite(p).all(), name
        if name == "position_embedding.weight":  # only the positions of the batches' windows were used
            assert moved[:width].any(dim=1).all() and not moved[width:].any(), name
        else:
            assert moved.any(), f"{name} did not change"
