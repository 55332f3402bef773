"""Item codes trained from scratch (RecJPQ's recipe) against the teacher, on the same data and budget.

`benchmarks/item_codes.py` codes a trained teacher's table after the fact and fine-tunes. RecJPQ
(arXiv 2312.06165) instead fixes each item's codes *before* training, from a truncated SVD of the
user-item matrix (code j of an item = the quantile bucket of its j-th singular-vector coordinate),
and trains the sub-item embeddings (codebooks) and the Transformer from scratch for the whole run.
This script does that with the train stage's own engine settings and loss (`train.teacher_loss`,
`train.engine_settings`: same epochs, early stopping, lr, batch, seed) on a workdir that already
holds features and a teacher (e.g. one `item_codes.py --workdir W` prepared), and reports test
NDCG@10 by full ranking against that teacher.

    python benchmarks/item_codes_from_scratch.py --workdir W --subspaces 4 8
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.item_codes import CODE_DATASETS, COMMON  # noqa: E402
from pipeline.core.config import load_params  # noqa: E402
from pipeline.data.sequences import SequenceData, load_sequences  # noqa: E402
from pipeline.evaluation.metrics import evaluate  # noqa: E402
from pipeline.models.coded import CodedSASRec  # noqa: E402
from pipeline.models.sasrec import load_model  # noqa: E402
from pipeline.training.engine import Engine  # noqa: E402
from pipeline.training.losses import module_loss  # noqa: E402
from pipeline.training.train import build_model_config, engine_settings, teacher_loss  # noqa: E402


def svd_codes(data: SequenceData, n_subspaces: int, codebook_size: int, seed: int) -> torch.Tensor:
    """(n_items + 1, m) uint8 codes: bucket of each item's coordinate on each of the m leading right
    singular vectors of the binary user-item matrix of the training interactions; row 0 gets code 0."""
    users, items = data.train_pairs()
    n_rows = data.n_items + 1
    matrix = torch.sparse_coo_tensor(np.stack([users, items]), torch.ones(len(items)),
                                     (int(users.max()) + 1, n_rows)).coalesce()
    matrix = torch.sparse_coo_tensor(matrix.indices(), torch.ones_like(matrix.values()), matrix.shape)  # binary
    torch.manual_seed(seed)
    _, _, v = torch.svd_lowrank(matrix, q=n_subspaces, niter=4)
    codes = torch.zeros(n_rows, n_subspaces, dtype=torch.uint8)
    buckets = codebook_size - 1  # code 0 is padding
    for j in range(n_subspaces):
        order = torch.argsort(v[1:, j])
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order))
        codes[1:, j] = (1 + rank * buckets // len(order)).to(torch.uint8)
    return codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--dataset", default="default", choices=list(CODE_DATASETS), help="the params the workdir was built with")
    parser.add_argument("--subspaces", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--codebook-size", type=int, default=256)
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = load_params(ROOT / "params.yaml", [*CODE_DATASETS[args.dataset], *COMMON, *args.overrides])
    root = Path(args.workdir)
    data = load_sequences(root / "data" / "features")
    teacher = load_model(root / "models" / params.train.run_name).eval()
    device = torch.device("cpu")

    def test_ndcg(model) -> float:
        return evaluate(lambda b: model.score(b.inputs, b.lengths), data, "test", ks=(10,), batch_size=512,
                        max_len=model.cfg.max_len, sampled_strategies=(), seed=params.seed, progress=False)["full/NDCG@10"]

    rows = {"teacher": {"ndcg@10": test_ndcg(teacher)}}
    for m in args.subspaces:
        torch.manual_seed(params.seed)
        model = CodedSASRec(build_model_config(params.train, data.n_items), m, min(args.codebook_size, data.n_items + 1))
        with torch.no_grad():
            model.table.codes.copy_(svd_codes(data, m, model.codebook_size, params.seed))
            model.table.codebooks.normal_(std=0.02)  # SASRec's embedding initialisation, per sub-vector
        # The teacher's settings, without its checkpoint; ending on the best validation epoch, which is
        # what the train stage saves for the teacher (on every improvement).
        settings = replace(engine_settings(params.train, params.seed, device, root / "unused.pt", False, 512),
                           checkpoint_path=None, restore_best=True)
        started = time.perf_counter()
        state = Engine(model, data, module_loss, settings, device, loss_module=teacher_loss(params.train, model, data, device)).fit()
        seconds = time.perf_counter() - started
        best = max(r["valid_ndcg10"] for r in state.history)
        ndcg = test_ndcg(model.eval())
        rows[f"jpq-m{m}"] = {"ndcg@10": ndcg, "change": ndcg / rows["teacher"]["ndcg@10"] - 1, "best_valid_ndcg10": best,
                             "epochs": len(state.history), "seconds": round(seconds, 1)}
        print(f"jpq m={m}: test NDCG@10 {ndcg:.4f} ({rows[f'jpq-m{m}']['change']:+.2%}), best valid {best:.4f}, "
              f"{len(state.history)} epochs, {seconds:.0f} s", flush=True)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
