"""The training engine on its own: early stopping, best weights, resume, hooks and pluggable losses."""

from dataclasses import replace

import pytest
import torch

from pipeline.data.sequences import load_sequences, n_training_batches
from pipeline.models.sasrec import SASRec, SASRecConfig
from pipeline.training.engine import Engine, EngineSettings, Hooks
from pipeline.training.losses import next_item_loss
from tests.helpers import build_features

# The compression fine-tunes' options and the teacher's: both must hold for every engine property.
FINETUNE = EngineSettings(epochs=3, lr=0.01, batch_size=64, seed=0, patience=10, token_normalisation="local",
                          trainable_only=True, reseed=True, validate_initial=True, restore_best=True)
TEACHER = EngineSettings(epochs=3, lr=0.01, batch_size=64, seed=0, patience=10, token_normalisation="global",
                         weight_decay=0.0, fused=True, trainable_only=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(1)
    return load_sequences(build_features(tmp_path_factory.mktemp("features")).features_dir)


def _model(data, seed: int = 0) -> SASRec:
    torch.manual_seed(seed)
    return SASRec(SASRecConfig(n_items=data.n_items, d_model=8, n_layers=1, n_heads=1, max_len=20, dropout=0.2))


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


class ScriptedEngine(Engine):
    """Validation returns a fixed sequence of NDCG@10 values, so early stopping is exactly predictable."""

    def __init__(self, *args, metrics: list[float], **kwargs):
        super().__init__(*args, **kwargs)
        self.metrics = iter(metrics)

    def validate(self) -> dict[str, float]:
        value = next(self.metrics)
        return {"full/NDCG@10": value, "full/HR@10": value}


def test_early_stopping_stops_after_patience_bad_epochs_and_keeps_the_best_weights(data):
    snapshots, improved = {}, []
    hooks = Hooks(on_epoch_end=lambda record: snapshots.update({record["epoch"]: _weights(model)}),
                  on_improve=lambda m, record: improved.append(record["epoch"]))
    model = _model(data)
    settings = replace(FINETUNE, epochs=20, patience=2, validate_initial=False)
    # epoch:        0    1    2     3     (4 never runs: two epochs without beating 0.3)
    metrics = [0.1, 0.3, 0.2, 0.25, 0.9]
    state = ScriptedEngine(model, data, next_item_loss, settings, torch.device("cpu"), hooks=hooks, metrics=metrics).fit()
    assert [r["epoch"] for r in state.history] == [0, 1, 2, 3]
    assert state.stopped_early and state.best_epoch == 1 and state.best_metric == 0.3 and state.bad_epochs == 2
    assert improved == [0, 1]
    _assert_same(_weights(model), snapshots[1])  # restore_best: the model ends holding epoch 1's weights
    assert not torch.equal(snapshots[1]["item_embedding.weight"], snapshots[3]["item_embedding.weight"])


def test_the_incoming_weights_are_kept_when_no_epoch_beats_them(data):
    model = _model(data)
    incoming = _weights(model)
    settings = replace(FINETUNE, epochs=5, patience=2)
    state = ScriptedEngine(model, data, next_item_loss, settings, torch.device("cpu"), metrics=[0.5, 0.4, 0.3]).fit()
    assert [r["epoch"] for r in state.history] == [-1, 0, 1] and state.best_epoch == -1
    _assert_same(_weights(model), incoming)


def test_without_restore_best_the_model_ends_with_its_last_weights(data):
    model, last = _model(data), {}
    hooks = Hooks(on_epoch_end=lambda record: last.update(_weights(model)))
    ScriptedEngine(model, data, next_item_loss, replace(TEACHER, epochs=2), torch.device("cpu"), hooks=hooks,
                   metrics=[0.5, 0.1]).fit()
    _assert_same(_weights(model), last)


@pytest.mark.parametrize("settings", [TEACHER, FINETUNE], ids=["teacher", "finetune"])
def test_resume_from_a_checkpoint_ends_where_an_uninterrupted_run_ends(data, tmp_path, settings):
    cpu = torch.device("cpu")
    straight_model = _model(data)
    straight = Engine(straight_model, data, next_item_loss, replace(settings, checkpoint_path=tmp_path / "a.pt"), cpu).fit()

    # Interrupted after epoch 0: a fresh process builds the same model and resumes from the checkpoint.
    checkpoint = tmp_path / "b.pt"
    Engine(_model(data), data, next_item_loss, replace(settings, epochs=1, checkpoint_path=checkpoint), cpu).fit()
    torch.manual_seed(123)  # whatever the RNG did in between: the checkpoint's state wins
    resumed_model = _model(data, seed=99)
    resumed = Engine(resumed_model, data, next_item_loss, replace(settings, checkpoint_path=checkpoint, resume=True), cpu).fit()

    _assert_same(_weights(straight_model), _weights(resumed_model))
    assert [r["valid_ndcg10"] for r in straight.history] == [r["valid_ndcg10"] for r in resumed.history]
    assert [r["loss"] for r in straight.history if "loss" in r] == [r["loss"] for r in resumed.history if "loss" in r]
    assert (resumed.epoch, resumed.best_epoch) == (straight.epoch, straight.best_epoch)


def test_resume_restores_best_weights_kept_in_memory(data, tmp_path):
    """With restore_best, the best weights travel in the checkpoint: a resumed run still ends holding them."""
    cpu = torch.device("cpu")
    # NDCG@10 of: the incoming weights, epoch 0 (the best), epochs 1 and 2.
    straight_model = _model(data)
    ScriptedEngine(straight_model, data, next_item_loss, replace(FINETUNE, checkpoint_path=tmp_path / "a.pt"), cpu,
                   metrics=[0.1, 0.5, 0.2, 0.3]).fit()
    checkpoint = tmp_path / "b.pt"
    ScriptedEngine(_model(data), data, next_item_loss, replace(FINETUNE, epochs=1, checkpoint_path=checkpoint), cpu,
                   metrics=[0.1, 0.5]).fit()
    resumed_model = _model(data, seed=99)
    state = ScriptedEngine(resumed_model, data, next_item_loss, replace(FINETUNE, checkpoint_path=checkpoint, resume=True),
                           cpu, metrics=[0.2, 0.3]).fit()
    assert state.best_epoch == 0 and [r["epoch"] for r in state.history] == [-1, 0, 1, 2]
    _assert_same(_weights(straight_model), _weights(resumed_model))


def test_a_fresh_run_deletes_an_older_checkpoint(data, tmp_path):
    checkpoint = tmp_path / "last.pt"
    checkpoint.write_bytes(b"stale")
    ScriptedEngine(_model(data), data, next_item_loss, replace(TEACHER, epochs=0, checkpoint_path=checkpoint),
                   torch.device("cpu"), metrics=[]).fit()
    assert not checkpoint.exists()


def test_after_step_runs_after_every_optimizer_step(data):
    model = _model(data)
    steps_seen = []
    engine = None

    def after_step(m: torch.nn.Module) -> None:
        first = next(iter(engine.optimizer.state.values()))  # filled by the step that just ran
        steps_seen.append(int(first["step"]))
        with torch.no_grad():
            m.item_embedding.weight[5].zero_()  # as pruning masks do: the step moved it, the hook resets it

    engine = ScriptedEngine(model, data, next_item_loss, replace(FINETUNE, epochs=2, validate_initial=False,
                            restore_best=False), torch.device("cpu"), hooks=Hooks(after_step=after_step), metrics=[0.1, 0.2])
    engine.fit()
    n_steps = 2 * n_training_batches(data, FINETUNE.batch_size)
    assert steps_seen == list(range(1, n_steps + 1))
    assert torch.count_nonzero(model.item_embedding.weight[5]) == 0


def test_a_custom_loss_is_the_one_trained(data):
    calls = []

    def table_norm(model: torch.nn.Module, batch) -> tuple[torch.Tensor, int]:
        tokens = int((batch.targets != 0).sum())
        loss = model.item_embedding.weight.pow(2).sum() * tokens  # a mean of exactly the table's squared norm
        calls.append(float(loss.detach()) / tokens)
        return loss, tokens

    model = _model(data)
    before = float(model.item_embedding.weight.detach().pow(2).sum())
    settings = replace(FINETUNE, epochs=2, validate_initial=False, restore_best=False)
    state = ScriptedEngine(model, data, table_norm, settings, torch.device("cpu"), metrics=[0.1, 0.2]).fit()
    assert len(calls) == 2 * n_training_batches(data, settings.batch_size)
    assert float(model.item_embedding.weight.detach().pow(2).sum()) < 0.5 * before  # it minimised the custom loss
    assert state.history[0]["loss"] < before and state.history[1]["loss"] < state.history[0]["loss"]


def test_global_and_local_token_normalisation_agree_in_one_process(data):
    results = []
    for normalisation in ("global", "local"):
        model = _model(data)
        settings = replace(FINETUNE, epochs=1, token_normalisation=normalisation, validate_initial=False, restore_best=False)
        ScriptedEngine(model, data, next_item_loss, settings, torch.device("cpu"), metrics=[0.1]).fit()
        results.append(_weights(model))
    _assert_same(*results)
