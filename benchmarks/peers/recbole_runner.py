"""RecBole 1.2.1's SASRec on an exported LeanRec split: runs in the peer's own venv, never the project's.

    /work/venvs/recbole/bin/python benchmarks/peers/recbole_runner.py --spec spec.json --out result.json

Started by benchmarks/time_to_quality.py. The spec names the atomic-file directory (data_path), the
dataset name and the RecBole config dict. This script imports nothing from LeanRec and copies nothing
of RecBole: it drives RecBole's own Config / create_dataset / data_preparation / SASRec / Trainer, with
the small shims below for torch 2.13 and numpy 2, and records, per epoch, the wall time from the
start of RecBole's data preparation to the end of that epoch's validation, and validation NDCG@10.
It also writes the (user, item) pairs of RecBole's validation targets in the exported tokens, so
the caller can check they are LeanRec's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np

# --- shims (compatibility only; RecBole's behaviour is unchanged) ------------------------------
# numpy 2 removed np.float_, np.complex_ and np.unicode_; RecBole 1.2.1's Config.compatibility_settings
# reads them to restore the old np.float / np.int / ... aliases, which its evaluator then uses.
for _old, _new in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
    if not hasattr(np, _old):
        setattr(np, _old, _new)
# torch >= 2.6 loads with weights_only=True by default; RecBole's checkpoints pickle its Config. This
# runner never saves or loads a checkpoint (fit(saved=False), no load_best_model), so no torch.load
# shim is needed; a later use of one would fail loudly rather than silently unpickle.

import torch  # noqa: E402
from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.model.sequential_recommender import SASRec  # noqa: E402
from recbole.trainer import Trainer  # noqa: E402
from recbole.utils import init_logger, init_seed  # noqa: E402


class OutOfTime(Exception):
    """Raised from the epoch callback once the spec's time budget is spent."""


def valid_targets(valid_data) -> list[tuple[int, int]]:
    """(user, item) of every validation target, in the exported tokens (LeanRec's user_idx, item_idx)."""
    dataset = valid_data._dataset
    uid, iid = dataset.uid_field, dataset.iid_field
    users = dataset.id2token(uid, dataset.inter_feat[uid].numpy())
    items = dataset.id2token(iid, dataset.inter_feat[iid].numpy())
    return sorted((int(u), int(i)) for u, i in zip(users, items, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    spec = json.loads(open(args.spec).read())
    torch.set_num_threads(spec.get("threads", 2))
    os.chdir(spec["workdir"])  # RecBole writes log/ and log_tensorboard/ under the working directory

    started = time.perf_counter()  # the clock: RecBole's data preparation, model build, every epoch and its validation
    config = Config(model="SASRec", dataset=spec["dataset"], config_dict=spec["config"])
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, _test_data = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = SASRec(config, train_data._dataset).to(config["device"])
    trainer = Trainer(config, model)
    prepared = time.perf_counter() - started
    print(json.dumps({"prepared_seconds": prepared}), file=sys.stderr, flush=True)

    history: list[dict] = []
    train_seconds: list[float] = []
    train_epoch = trainer._train_epoch

    def timed_train_epoch(*a, **kw):
        t0 = time.perf_counter()
        out = train_epoch(*a, **kw)
        train_seconds.append(time.perf_counter() - t0)
        return out

    trainer._train_epoch = timed_train_epoch

    def on_epoch(epoch_idx: int, valid_score: float) -> None:
        history.append({"epoch": epoch_idx + 1, "valid_ndcg10": float(valid_score),
                        "elapsed_seconds": time.perf_counter() - started, "train_seconds": train_seconds[-1],
                        "train_loss": float(trainer.train_loss_dict[epoch_idx])})
        print(json.dumps({"progress": history[-1]}), file=sys.stderr, flush=True)
        if budget is not None and history[-1]["elapsed_seconds"] >= budget:
            raise OutOfTime

    budget = spec.get("time_budget_seconds")
    stopped_by_budget = False
    try:
        trainer.fit(train_data, valid_data, saved=False, show_progress=False, verbose=False, callback_fn=on_epoch)
    except OutOfTime:  # the caller's wall-clock cap: the epochs so far are the result
        stopped_by_budget = True
    targets = valid_targets(valid_data)
    result = {
        "system": "recbole-1.2.1 SASRec", "loss": config["loss_type"], "prepare_seconds": prepared,
        "stopped_by_time_budget": stopped_by_budget, "time_budget_seconds": budget,
        "seconds": time.perf_counter() - started, "history": history,
        "n_items": int(dataset.item_num - 1), "n_users": int(dataset.user_num - 1),
        "n_train_samples": len(train_data._dataset), "n_valid_targets": len(targets),
        "valid_targets_sha256": hashlib.sha256(json.dumps(targets).encode()).hexdigest(),
        "parameters": sum(p.numel() for p in model.parameters()), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
