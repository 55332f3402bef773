"""The row-wise sharded item table (train.embedding_engine=torchrec, pipeline/training/sharded.py).

The equivalence test trains the same tiny SASRec twice on the same batches: once as two Gloo
processes through the training engine, each holding half of the item table (TorchRec, fused
Adagrad), and once in this process without TorchRec: NextItemLoss on a dense table, AdamW for
the blocks and torch.optim.Adagrad for the table (FBGEMM's exact Adagrad is the same update).
Both must end with the same losses, validation NDCG@10 and weights. It runs again with SGD for
the table: Adagrad's step hardly changes if the table's gradient is off by a constant factor
(a 1/N too many, say), SGD's is proportional to it.
"""

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pydantic import ValidationError

from pipeline.core.config import TrainConfig, params_from_dict
from pipeline.core.errors import ConfigError
from pipeline.data.sequences import SequenceData, training_batches
from pipeline.evaluation.metrics import evaluate
from pipeline.models.sasrec import SASRec, SASRecConfig, load_model
from pipeline.training.distributed import Dist
from pipeline.training.engine import BETAS, VALID_METRIC, Engine, EngineSettings, Hooks
from pipeline.training.losses import NextItemLoss, module_loss
from pipeline.training.sharded import ADAGRAD_EPS, ShardedSASRec
from tests.helpers import build_features

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]

WORLD = 2
N_ITEMS = 41  # 42 rows with padding: 21 per rank
N_NEGATIVES = 16
# The teacher's engine options (train.py's engine_settings) on a tiny run, without checkpoints.
SETTINGS = EngineSettings(epochs=2, lr=0.01, batch_size=16, seed=0, patience=10, eval_batch_size=64, token_normalisation="global",
                          weight_decay=0.0, fused=True, trainable_only=False, reseed=True)
MODEL = SASRecConfig(n_items=N_ITEMS, d_model=8, n_layers=1, n_heads=2, max_len=12, dropout=0.0)
# Float32 sums in another order (a gradient summed over two ranks or over one batch) differ by ~1e-7 relative;
# after 6 steps the weights measured differ by up to 5e-6 (Adam's step on a near-zero gradient amplifies it).
# Training moves them by 3e-3..6e-2 (checked below); a wrong row or a table gradient off by 2x differed by over 1e-3.
ATOL = 5e-5


def _data() -> SequenceData:
    """48 users with 6..14 items (each: train prefix, 1 valid, 1 test): 3 batches of 16 users an epoch."""
    rng = np.random.default_rng(7)
    lengths = rng.integers(6, 15, size=48)
    items = np.concatenate([rng.integers(1, N_ITEMS + 1, size=n) for n in lengths]).astype(np.int64)
    return SequenceData(users=np.arange(1, 49, dtype=np.int64), offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                        items=items, n_train=(lengths - 2).astype(np.int64), n_valid=np.ones(48, np.int64),
                        n_test=np.ones(48, np.int64), n_items=N_ITEMS, n_user_index=48)


def _logq(data: SequenceData) -> torch.Tensor:
    counts = torch.from_numpy(data.train_item_counts()).double() + 1.0  # as train.py builds it
    counts[0] = 0.0
    return (counts / counts.sum()).log().float()


def _initial_model() -> SASRec:
    torch.manual_seed(0)
    return SASRec(MODEL)


def _validate(score, data: SequenceData) -> float:
    return evaluate(score, data, "valid", ks=(10,), batch_size=SETTINGS.eval_batch_size, max_len=MODEL.max_len,
                    device=torch.device("cpu"), sampled_strategies=(), seed=SETTINGS.seed, progress=False)[VALID_METRIC]


def _sharded_worker(rank: int, port: int, data: SequenceData, table_optimizer: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    world, device = Dist(rank, WORLD), torch.device("cpu")
    model = ShardedSASRec(MODEL, N_NEGATIVES, _logq(data))
    step_module = model.shard(world, device, SETTINGS.lr, table_optimizer)
    model.load_encoder(_initial_model())
    start, rows = model.local_rows()
    engine = Engine(model, data, module_loss, SETTINGS, device, world=world, step_module=step_module,
                    hooks=Hooks(before_validate=lambda m: m.gather_table()))
    state = engine.fit()
    if rank == 0:
        torch.save({"history": state.history, "table": model.full_table, "rows": (start, rows),
                    "encoder": model.encoder.state_dict(), "exported": model.to_sasrec().state_dict()}, out)
    else:
        torch.save({"rows": (start, rows)}, out + ".1")
    dist.destroy_process_group()


def _unsharded_run(data: SequenceData, table_optimizer: str) -> tuple[list[float], float, SASRec]:
    """One process, no TorchRec: the engine's loop (global batches, the same seed) written out."""
    model = _initial_model()
    loss_module = NextItemLoss(model, "sampled_softmax", N_NEGATIVES, _logq(data), block_logits=1)
    table = model.item_embedding.weight
    dense = [p for name, p in model.named_parameters() if name != "item_embedding.weight"]
    optimizer = torch.optim.AdamW(dense, lr=SETTINGS.lr, betas=BETAS, weight_decay=0.0)
    table_optimizer = (torch.optim.Adagrad([table], lr=SETTINGS.lr, eps=ADAGRAD_EPS) if table_optimizer == "adagrad"
                       else torch.optim.SGD([table], lr=SETTINGS.lr))
    losses = []
    torch.manual_seed(SETTINGS.seed)  # reseed=True: what Engine.fit does first
    model.train()
    for epoch in range(SETTINGS.epochs):
        total, tokens = 0.0, 0
        for batch in training_batches(data, SETTINGS.batch_size, MODEL.max_len, SETTINGS.seed, epoch):
            loss_sum, n = module_loss(loss_module, batch)
            optimizer.zero_grad(set_to_none=True)
            table_optimizer.zero_grad(set_to_none=True)
            (loss_sum / n).backward()
            optimizer.step()
            table_optimizer.step()
            total, tokens = total + float(loss_sum.detach()), tokens + n
        losses.append(total / tokens)
    model.eval()
    return losses, _validate(lambda b: model.score(b.inputs, b.lengths), data), model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("table_optimizer", ["adagrad", "sgd"])
def test_two_ranks_with_half_the_table_each_train_as_one_unsharded_process(tmp_path, table_optimizer):
    data = _data()
    out = str(tmp_path / "sharded.pt")
    mp.spawn(_sharded_worker, args=(_free_port(), data, table_optimizer, out), nprocs=WORLD)
    sharded = torch.load(out, weights_only=False)
    assert sharded["rows"] == (0, 21) and torch.load(out + ".1", weights_only=False)["rows"] == (21, 21)  # row-wise: halves

    torch.set_num_threads(1)
    losses, valid, reference = _unsharded_run(data, table_optimizer)
    expected = reference.state_dict()
    initial = _initial_model().state_dict()
    logger.info("losses sharded %s unsharded %s", [r["loss"] for r in sharded["history"]], losses)

    assert [r["loss"] for r in sharded["history"]] == pytest.approx(losses, abs=1e-5)
    assert sharded["history"][-1]["valid_ndcg10"] == pytest.approx(valid, abs=1e-6)
    table = expected["item_embedding.weight"]
    assert (table - initial["item_embedding.weight"]).abs().max() > 2e-3  # far above ATOL
    torch.testing.assert_close(sharded["table"], table, atol=ATOL, rtol=0)
    assert max((expected[k] - initial[k]).abs().max() for k in sharded["encoder"]) > 1e-3
    for name, value in sharded["encoder"].items():
        torch.testing.assert_close(value, expected[name], atol=ATOL, rtol=0, msg=name)
    assert sharded["exported"].keys() == expected.keys()
    torch.testing.assert_close(sharded["exported"], expected, atol=ATOL, rtol=0)


def test_torchrec_needs_the_sampled_softmax():
    with pytest.raises(ValidationError, match="embedding_engine=torchrec needs loss sampled_softmax"):
        TrainConfig(embedding_engine="torchrec", loss="full_softmax")
    with pytest.raises(ConfigError, match="needs loss sampled_softmax"):
        params_from_dict({}, ["train.embedding_engine=torchrec"])  # params.yaml's loss is full_softmax
    assert TrainConfig(embedding_engine="torchrec", loss="sampled_softmax").embedding_engine == "torchrec"


@pytest.mark.slow
def test_the_train_stage_under_torchrun_shards_the_table_and_saves_a_whole_model(tmp_path):
    layout = build_features(tmp_path)
    overrides = ["train.d_model=16", "train.n_heads=2", "train.n_layers=1", "train.max_len=20", "train.batch_size=32",
                 "train.num_threads=1", "train.baselines=[popularity]", "tracking.enabled=false", "train.epochs=2",
                 "train.embedding_engine=torchrec", "train.loss=sampled_softmax", "train.n_negatives=32", "train.sharded_table_lr=0.07"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={WORLD}", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", "-m", "pipeline", "train", "--workdir", str(layout.root)]
    for override in overrides:
        command += ["-S", override]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_rows = json.loads((layout.model_dir("main") / "model_config.json").read_text())["n_items"] + 1
    half = -(-n_rows // WORLD)
    assert f"rank 0 holds rows [0, {half}) of {n_rows}; its fused adagrad at lr 0.07" in proc.stderr  # not train.lr
    assert f"rank 1 holds rows [{half}, {n_rows}) of {n_rows}; its fused adagrad at lr 0.07" in proc.stderr
    model = load_model(layout.model_dir("main"))  # the whole table, gathered on rank 0
    assert model.item_embedding.weight.shape == (n_rows, 16)
    assert torch.equal(model.item_embedding.weight[0], torch.zeros(16))  # padding
    history = json.loads((layout.model_dir("main") / "history.json").read_text())
    assert len(history) == 2 and all(record["valid_ndcg10"] > 0 for record in history)
