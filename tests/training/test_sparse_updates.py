"""train.sparse_item_updates: sparse item-table gradients under sampled softmax, SparseAdam for the table.

What "matches dense training" means here: SparseAdam is lazy Adam. On the first step every moment is zero,
so both optimizers move exactly the touched rows by the same amount (up to where eps enters the update
and float summation order); from the second step dense AdamW also moves rows touched earlier but not now
(their momentum), SparseAdam does not. So: the first step agrees to float rounding, the second differs in
exactly those rows, and whole runs on tiny data reach a validation NDCG@10 within a tolerance.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.core.config import params_from_dict
from pipeline.core.errors import ConfigError, TrainError
from pipeline.data.sequences import load_sequences, training_batches
from pipeline.models.sasrec import SASRec
from pipeline.training.engine import Engine, SparseAndDense
from pipeline.training.losses import module_loss
from pipeline.training.train import CHECKPOINT_FILE, build_model_config, engine_settings, run_train, teacher_loss
from tests.helpers import build_features, copy_features

ROOT = Path(__file__).resolve().parents[2]
FAST = ["train.d_model=16", "train.n_heads=2", "train.n_layers=1", "train.max_len=20", "train.batch_size=32",
        "train.num_threads=1", "train.baselines=[]", "tracking.enabled=false", "train.loss=sampled_softmax",
        "train.n_negatives=20"]


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return build_features(tmp_path_factory.mktemp("features"))


def _params(*overrides):
    return params_from_dict({}, [*FAST, *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["train.loss=full_softmax"], "needs loss=sampled_softmax"),
    (["train.loss=chunked_softmax"], "needs loss=sampled_softmax"),
    (["train.loss=auto"], "needs loss=sampled_softmax"),
    (["train.weight_decay=0.01"], "no weight decay"),
])
def test_sparse_updates_are_rejected_at_config_load_where_they_would_be_dense_or_wrong(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _params("train.sparse_item_updates=true", *overrides)


def _engine(features, tmp_path, sparse: bool) -> tuple[Engine, SASRec]:
    cfg = _params(f"train.sparse_item_updates={str(sparse).lower()}", "train.dropout=0.0").train
    data = load_sequences(features.features_dir)
    torch.manual_seed(0)
    model = SASRec(build_model_config(cfg, data.n_items))
    loss_module = teacher_loss(cfg, model, data, torch.device("cpu"))
    settings = engine_settings(cfg, 0, torch.device("cpu"), tmp_path / "unused.pt", False, 512)
    return Engine(model, data, module_loss, settings, torch.device("cpu"), loss_module=loss_module), model


def _two_batches(engine: Engine):
    batches = training_batches(engine.data, engine.settings.batch_size, engine.model.cfg.max_len, seed=0, epoch=0)
    return next(batches), next(batches)


def test_the_first_step_matches_dense_adamw_and_the_second_leaves_untouched_rows_alone(features, tmp_path):
    (dense, dense_model), (sparse, sparse_model) = _engine(features, tmp_path, False), _engine(features, tmp_path, True)
    assert isinstance(sparse.optimizer, SparseAndDense) and isinstance(dense.optimizer, torch.optim.AdamW)
    assert [p is sparse_model.item_embedding.weight for p in sparse.optimizer.optimizers["sparse"].param_groups[0]["params"]] == [True]
    start = {k: v.clone() for k, v in dense_model.state_dict().items()}
    first, second = _two_batches(dense)

    torch.manual_seed(1)  # the same negatives in both: the sampler draws from the global RNG
    dense.train_step(first)
    torch.manual_seed(1)
    sparse.train_step(first)
    grad = sparse_model.item_embedding.weight.grad
    assert grad.is_sparse
    touched = torch.unique(grad.coalesce().indices())
    n_rows = sparse_model.item_embedding.weight.shape[0]
    assert 0 < len(touched) < n_rows  # some rows had no input, target or negative in this batch
    assert set(touched.tolist()) >= set(torch.unique(first.targets[first.targets != 0]).tolist())
    for key, value in dense_model.state_dict().items():
        if key != "item_embedding.weight":  # the same gradients through the same AdamW
            torch.testing.assert_close(sparse_model.state_dict()[key], value, rtol=1e-5, atol=1e-7, msg=key)
    # The first Adam step moves each touched weight by lr * g / (|g| + eps'), about lr: AdamW has eps' = eps,
    # SparseAdam eps / sqrt(1 - beta2) (it adds eps before bias correction), which shows on the smallest
    # gradients only. 1% of lr tells that apart from a missed, doubled or misplaced row update (a move of lr).
    lr = dense.settings.lr
    torch.testing.assert_close(sparse_model.item_embedding.weight, dense_model.item_embedding.weight, rtol=0, atol=0.01 * lr)
    untouched = torch.ones(n_rows, dtype=torch.bool)
    untouched[touched] = False
    after_first = {"dense": dense_model.item_embedding.weight.detach().clone(),
                   "sparse": sparse_model.item_embedding.weight.detach().clone()}
    assert torch.equal(after_first["sparse"][untouched], start["item_embedding.weight"][untouched])  # zero moments: no move
    assert torch.equal(after_first["dense"][untouched], start["item_embedding.weight"][untouched])
    assert not torch.equal(after_first["sparse"][touched], start["item_embedding.weight"][touched])

    torch.manual_seed(2)
    dense.train_step(second)
    torch.manual_seed(2)
    sparse.train_step(second)
    now = torch.unique(sparse_model.item_embedding.weight.grad.coalesce().indices())
    stale = torch.zeros(n_rows, dtype=torch.bool)
    stale[touched] = True
    stale[now] = False  # touched by the first step, not by the second
    assert stale.any()
    # SparseAdam leaves them where the first step put them; dense AdamW keeps moving them on their momentum.
    assert torch.equal(sparse_model.item_embedding.weight.detach()[stale], after_first["sparse"][stale])
    assert not torch.equal(dense_model.item_embedding.weight.detach()[stale], after_first["dense"][stale])
    assert not torch.equal(sparse_model.item_embedding.weight.detach()[now], after_first["sparse"][now])


def test_sparse_training_reaches_the_validation_quality_of_dense_training(features, tmp_path):
    results = {}
    for sparse in (False, True):
        layout = copy_features(features, tmp_path / str(sparse))
        p = _params("train.epochs=8", "train.early_stopping_patience=10", f"train.sparse_item_updates={str(sparse).lower()}")
        results[sparse] = run_train(p.train, p.tracking, layout, seed=3)
    dense, sparse = results[False], results[True]
    first_epoch = min(dense.history[0]["valid_ndcg10"], sparse.history[0]["valid_ndcg10"])
    assert dense.best_valid_ndcg10 > 2 * first_epoch  # both learnt something in 8 epochs (0.08 -> 0.26 when written) ...
    assert sparse.best_valid_ndcg10 > 2 * first_epoch
    assert sparse.best_valid_ndcg10 == pytest.approx(dense.best_valid_ndcg10, rel=0.08)  # ... and about as much (2% apart)


def test_sparse_updates_resume_from_a_checkpoint_where_an_uninterrupted_run_ends(features, tmp_path):
    overrides = ["train.early_stopping_patience=10", "train.sparse_item_updates=true"]
    straight = copy_features(features, tmp_path / "straight")
    p = _params("train.epochs=3", *overrides)
    run_train(p.train, p.tracking, straight, seed=4)

    resumed = copy_features(features, tmp_path / "resumed")
    interrupted = _params("train.epochs=1", *overrides)
    run_train(interrupted.train, interrupted.tracking, resumed, seed=4)
    checkpoint = torch.load(resumed.model_dir("main") / CHECKPOINT_FILE, weights_only=True)
    assert set(checkpoint["optimizer"]) == {"dense", "sparse"} and checkpoint["optimizer"]["sparse"]["state"]
    torch.manual_seed(99)  # whatever the RNG did in between, the checkpoint's state wins
    result = run_train(p.train, p.tracking, resumed, seed=4, resume=True)
    assert len(result.history) == 3
    a = torch.load(straight.model_dir("main") / CHECKPOINT_FILE, weights_only=True)
    b = torch.load(resumed.model_dir("main") / CHECKPOINT_FILE, weights_only=True)
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=0, atol=0)
    best_a = load_file(str(Path(straight.model_dir("main")) / "model.safetensors"))
    best_b = load_file(str(Path(resumed.model_dir("main")) / "model.safetensors"))
    for key in best_a:
        torch.testing.assert_close(best_b[key], best_a[key], rtol=0, atol=0)


def test_a_dense_checkpoint_does_not_resume_a_sparse_run(features, tmp_path):
    layout = copy_features(features, tmp_path)
    dense = _params("train.epochs=1")
    run_train(dense.train, dense.tracking, layout, seed=4)
    sparse = _params("train.epochs=2", "train.sparse_item_updates=true")
    # Refused before any weight is loaded, naming the setting (the engine's own check stays for older checkpoints).
    with pytest.raises(TrainError, match="train.sparse_item_updates: False there, True now"):
        run_train(sparse.train, sparse.tracking, layout, seed=4, resume=True)


@pytest.mark.slow
def test_sparse_updates_on_two_cpu_processes_match_one_process(features, tmp_path):
    """DDP (Gloo) all-reduces the sparse table gradient: two ranks end where one process does."""
    overrides = [*FAST, "train.sparse_item_updates=true", "train.epochs=2", "train.dropout=0.0",
                 "train.early_stopping_patience=10"]

    def cli(root: Path, launcher: list[str]) -> list[str]:
        return [*launcher, "-m", "pipeline", "train", "--workdir", str(root), *[a for o in overrides for a in ("-S", o)]]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    single, ddp = copy_features(features, tmp_path / "single"), copy_features(features, tmp_path / "ddp")
    subprocess.run(cli(single.root, [sys.executable]), check=True, capture_output=True, cwd=ROOT, timeout=600)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", f"--master_port={port}"]
    proc = subprocess.run(cli(ddp.root, launcher), capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world=2" in proc.stderr and "SparseAdam" in proc.stderr
    a = load_file(str(single.model_dir("main") / "model.safetensors"))
    b = load_file(str(ddp.model_dir("main") / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4)
