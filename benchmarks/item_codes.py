"""Item codes: how many sub-spaces a catalogue needs, measured on one trained teacher.

For each dataset: ingest -> validate -> features -> train the teacher once (or reuse the
teacher already in `--workdir`), then for every m in `--subspaces` the `pq` and `pq+int8`
variants are built by the compress stage itself (pipeline/compression/compress.py: codes by
k-means per sub-space of the teacher's table, codebooks and Transformer fine-tuned with the
teacher's loss) and kept as variants/pq-m<m>[+int8]. Every model is then measured in one
process by the evaluate stage's report (pipeline/evaluation/compression_report.py): full-ranking
NDCG@10 on the test split, bytes on disk, bytes per item (codes + codebooks), latency.

    python benchmarks/item_codes.py --dataset default --subspaces 4 8 16 32
    python benchmarks/item_codes.py --dataset catalogue-100k --subspaces 4 8 --workdir /tmp/codes-100k
    python benchmarks/item_codes.py --dataset ml-100k -S compress.pq.finetune_epochs=20

Writes benchmarks/results/item-codes-<dataset>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.data_pipeline import DATASETS  # noqa: E402
from pipeline.compression.compress import compress_variant  # noqa: E402
from pipeline.core.config import load_params  # noqa: E402
from pipeline.core.io import Layout  # noqa: E402
from pipeline.data.features import run_features  # noqa: E402
from pipeline.data.ingest import run_ingest  # noqa: E402
from pipeline.data.validation import run_validate  # noqa: E402
from pipeline.evaluation.compression_report import TEACHER, measure_models  # noqa: E402
from pipeline.models.sasrec import WEIGHTS_FILE  # noqa: E402
from pipeline.models.variants import variants_dir  # noqa: E402
from pipeline.training.train import run_train  # noqa: E402

CODE_DATASETS: dict[str, list[str]] = {
    "default": [],  # params.yaml as it is: the embedded default of `dvc repro`
    "synthetic-200k": ["ingest.synthetic.n_interactions=200000", "ingest.synthetic.n_items=3000"],  # the default before 2026-12-02
    "ml-100k": DATASETS["ml-100k"],
    "synthetic-1m": ["ingest.synthetic.n_interactions=1000000", "ingest.synthetic.n_items=5000"],
    # A catalogue where the item table dominates the model: 100,439 items after filtering (items
    # need 2 interactions), 49,663 users, trained with sampled softmax (the full softmax's
    # tokens x 100k logits would cost about an hour per epoch on 2 cores).
    "catalogue-100k": ["ingest.synthetic.n_interactions=2000000", "ingest.synthetic.n_items=120000",
                       "ingest.synthetic.mean_sequence_length=40.0", "features.min_item_interactions=2",
                       "train.loss=sampled_softmax", "train.n_negatives=1024"],
}
COMMON = ["tracking.enabled=false", "train.baselines=[]"]


def teacher_layout(dataset: str, workdir: Path, overrides: list[str]) -> tuple[Layout, float | None]:
    """The workdir's layout with a trained teacher: trained here unless one is already there."""
    params = load_params(ROOT / "params.yaml", [*CODE_DATASETS[dataset], *COMMON, *overrides])
    layout = Layout(workdir)
    if (layout.model_dir(params.train.run_name) / WEIGHTS_FILE).exists():
        return layout, None
    run_ingest(params.ingest, layout, seed=params.seed)
    run_validate(params.validate_, layout)
    run_features(params.features, layout)
    started = time.perf_counter()
    run_train(params.train, params.tracking, layout, seed=params.seed)
    return layout, time.perf_counter() - started


def build_codes(layout: Layout, dataset: str, subspaces: list[int], overrides: list[str]) -> dict[str, Path]:
    """variants/pq-m<m> and pq-m<m>+int8 for every m, each built by the compress stage."""
    directories: dict[str, Path] = {}
    for m in subspaces:
        params = load_params(ROOT / "params.yaml", [*CODE_DATASETS[dataset], *COMMON, *overrides,
                                                    f"compress.pq.n_subspaces={m}"])
        run_name = params.train.run_name
        out = variants_dir(layout, run_name)
        for name in ("pq", "pq+int8"):
            result = compress_variant(params.compress, layout, run_name, name, params.seed)
            kept = out / name.replace("pq", f"pq-m{m}", 1)
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(result["path"], kept)
            directories[kept.name] = kept
            logging.getLogger(__name__).warning("%s built in %.1fs", kept.name, result["seconds"])
    return directories


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="default", choices=list(CODE_DATASETS))
    parser.add_argument("--subspaces", nargs="+", type=int, default=[4, 8, 16, 32])
    parser.add_argument("--workdir", default=None, help="keep data and models here (reused when a teacher exists)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], help="params override")
    parser.add_argument("--timing-users", type=int, default=None, help="time serving on this many test users (default all)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix=f"leanrec-codes-{args.dataset}-") as tmp:
        workdir = Path(args.workdir or tmp)
        layout, train_seconds = teacher_layout(args.dataset, workdir, args.overrides)
        params = load_params(ROOT / "params.yaml", [*CODE_DATASETS[args.dataset], *COMMON, *args.overrides])
        directories = {TEACHER: layout.model_dir(params.train.run_name),
                       **build_codes(layout, args.dataset, args.subspaces, args.overrides)}
        report = measure_models(directories, layout, params.compress, params.evaluate, params.seed,
                                timing_users=args.timing_users)
    teacher = report["models"][TEACHER]
    for row in report["models"].values():
        row["item_ratio"] = teacher["bytes_per_item"] / row["bytes_per_item"]
    report.update(dataset=args.dataset, overrides=args.overrides, train_seconds=train_seconds,
                  machine={"python": platform.python_version(), "torch": torch.__version__,
                           "threads": torch.get_num_threads()})
    lines = [f"# Item codes on {args.dataset} ({report['users']} test users, serving timed on {report['timed_users']}, "
             f"{report['threads']} threads)", "",
             "| model | NDCG@10 | change | item bytes | items smaller | size KiB | model smaller | p50 ms | speed-up "
             "| users/s at batch 256 | speed-up |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in report["models"].items():
        lines.append(f"| {name} | {r['ndcg@10']:.4f} | {r['ndcg@10_change']:+.2%} | {r['bytes_per_item']:.1f} | "
                     f"{r['item_ratio']:.1f}x | {r['size_bytes'] / 1024:,.1f} | {r['size_ratio']:.1f}x | "
                     f"{r['latency_p50_ms']:.3f} | {r['latency_speedup']:.2f}x | {r['throughput_users_s']:,.0f} | "
                     f"{r['throughput_users_s'] / teacher['throughput_users_s']:.2f}x |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"item-codes-{args.dataset}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / f"item-codes-{args.dataset}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
