"""Quality, size and serving cost of the teacher and every compressed variant, side by side.

Part of the evaluate stage: one process, one machine, one test split. Each
model is evaluated with full ranking (the training protocol) and timed through
`pipeline.models.recommender.Recommender` (the serving path): batch-1 latency p50/p95 and
throughput at a fixed batch size, top-10 over the whole catalogue, after
warm-up, with the thread count pinned and recorded. Timing runs in interleaved
rounds, each in a rotated order, so drift of a shared machine falls on every
model alike; the figures are medians over rounds.

Beside NDCG@10/HR@10 each model gets the beyond-accuracy metrics of its top-10 lists
(pipeline/evaluation/metrics.py: ILD@10 in the teacher's item table for every model, novelty,
coverage, Gini index of exposure).

Outputs: reports/compression.json (DVC metrics), reports/compression.md,
reports/compression.png (Pareto chart, pipeline/evaluation/pareto.py: NDCG@10 against batch-1
latency, point area proportional to bytes on disk, the teacher marked), and one MLflow child run per variant under
the training run.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.core.config import CompressConfig, EvaluateConfig, TrackingConfig, TrainConfig
from pipeline.core.errors import PipelineError
from pipeline.core.io import Layout, atomic_path, write_json
from pipeline.data.sequences import evaluation_batches, load_sequences
from pipeline.evaluation.metrics import BEYOND_ACCURACY, evaluate
from pipeline.evaluation.pareto import TEACHER, pareto_chart
from pipeline.evaluation.serving_cost import measure_serving
from pipeline.evaluation.summary import COMPRESSION_REPORT
from pipeline.models.coded import CODES_PREFIX
from pipeline.models.recommender import Recommender
from pipeline.models.sasrec import WEIGHTS_FILE
from pipeline.models.variants import VARIANT_FILE, QuantizedTableSASRec, load_variant, size_on_disk, variants_dir

logger = logging.getLogger(__name__)

REPORT_JSON = COMPRESSION_REPORT
REPORT_MD = "compression.md"
REPORT_PNG = "compression.png"
ROUNDS = 5
TABLE_PREFIXES = ("item_embedding.", "table.", "item_factors", "basis", f"{CODES_PREFIX}.")


def stored_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / WEIGHTS_FILE))


def item_table_bytes(directory: Path) -> int:
    """Bytes the stored item table takes (codes, scales, offsets, factors or sparse parts alike)."""
    return sum(t.numel() * t.element_size() for k, t in stored_tensors(directory).items() if k.startswith(TABLE_PREFIXES))


def parameter_count(model: torch.nn.Module) -> int:
    """Weights the model holds, however stored (a row-wise quantized table is kept outside state_dict).

    Item codes count one per stored code (n_rows * m) beside their codebooks' entries: the values
    the table is made of, as a quantized table counts its n_rows * d entries.
    """
    count = sum(t.numel() for t in model.state_dict().values())
    return count + (model.table.codes.shape[0] * model.table.dim if isinstance(model, QuantizedTableSASRec) else 0)


def nonzero_parameters(model: torch.nn.Module) -> int:
    total = 0
    for tensor in model.state_dict().values():
        if hasattr(tensor, "__tensor_flatten__") and type(tensor) is not torch.Tensor:
            total += tensor.numel()  # quantized: zeros are not stored specially
        elif not tensor.is_floating_point():
            total += tensor.numel()  # item codes: code 0 is an index like any other, not a pruned weight
        else:
            total += int((tensor != 0).sum())
    return total + (int((model.item_weights() != 0).sum()) if isinstance(model, QuantizedTableSASRec) else 0)


COMPRESS_COMMAND = "python -m pipeline compress"


def runtime_columns(model: torch.nn.Module, batch_size: int) -> dict:
    """What computes the user vectors on CPU at each timed batch size (1 and `batch_size`): "onnx" or "torch"
    (`compress.runtime: auto` may choose each), and one label for the table: "onnx", or "onnx / torch" by batch."""
    chosen = {str(size): model.runtime_for(size) for size in (1, batch_size)}
    label = chosen["1"] if len(set(chosen.values())) == 1 else f"{chosen['1']} / {chosen[str(batch_size)]}"
    return {"runtime": label, "runtime_by_batch": chosen}


def find_models(cfg: CompressConfig, layout: Layout, run_name: str) -> tuple[dict[str, Path], list[str]]:
    """The teacher and the configured variants that were built (name -> directory), and the names not built.

    Cheap (file checks only), so a stage knows what it will measure before it measures anything.
    """
    run_dir = layout.model_dir(run_name)
    if not (run_dir / WEIGHTS_FILE).exists():
        raise PipelineError(f"no SASRec teacher in {run_dir}: run the train stage first (python -m pipeline train)")
    directories = {TEACHER: run_dir}
    missing = []
    for name in cfg.variants:
        directory = variants_dir(layout, run_name) / name
        if (directory / VARIANT_FILE).exists():
            directories[name] = directory
        else:
            missing.append(name)
    return directories, missing


def missing_variants_message(missing: list[str], layout: Layout, run_name: str) -> str:
    where = variants_dir(layout, run_name)
    return (f"compress.variants {missing} are not built (no {where}/<name>/{VARIANT_FILE} for them): "
            f"run `{COMPRESS_COMMAND}` to build them")


def model_directories(cfg: CompressConfig, layout: Layout, run_name: str) -> dict[str, Path]:
    """The teacher and every configured variant; a PipelineError naming the variants not built."""
    directories, missing = find_models(cfg, layout, run_name)
    if missing:
        raise PipelineError(missing_variants_message(missing, layout, run_name))
    return directories


def _timed(recommenders: dict[str, Recommender], histories: list[list[int]], cfg: CompressConfig) -> dict[str, dict]:
    names = list(recommenders)
    costs: dict[str, list] = {name: [] for name in names}
    requests = max(1, cfg.latency_requests // ROUNDS)
    for round_index in range(ROUNDS):
        for offset in range(len(names)):
            name = names[(round_index + offset) % len(names)]
            costs[name].append(measure_serving(recommenders[name], histories, requests=requests, warmup=10,
                                               batch_size=cfg.throughput_batch_size, threads=cfg.threads))
    timed = {}
    for name, runs in costs.items():
        timed[name] = {
            "latency_p50_ms": statistics.median(c.latency_p50_ms for c in runs),
            "latency_p95_ms": statistics.median(c.latency_p95_ms for c in runs),
            "throughput_users_s": statistics.median(c.throughput_users_per_s for c in runs),
            "threads": runs[0].threads,
        }
    return timed


def measure_models(directories: dict[str, Path], layout: Layout, cfg: CompressConfig, eval_cfg: EvaluateConfig,
                   seed: int, split: str = "test", timing_users: int | None = None) -> dict:
    """Every model's quality, size and serving cost (CPU, and CUDA when present).

    Quality is over every user of `split`; latency and throughput over the first `timing_users`
    of them (all by default: a benchmark on a large catalogue times a sample).
    """
    data = load_sequences(layout.features_dir)
    models = {name: load_variant(directory) for name, directory in directories.items()}
    max_len = models[TEACHER].cfg.max_len
    batch = next(evaluation_batches(data, split, 1 << 30, max_len))
    histories = [row[: int(n)].tolist() for row, n in zip(batch.inputs, batch.lengths)]
    rows: dict[str, dict] = {}
    # ILD in one vector space for every model: the teacher's item table (a variant's own table is compressed).
    teacher_vectors = models[TEACHER].item_weights().detach()
    for position, (name, model) in enumerate(models.items(), start=1):
        started = time.perf_counter()
        quality = evaluate(lambda b, m=model: m.score(b.inputs, b.lengths), data, split, ks=(10,),
                           batch_size=eval_cfg.batch_size, max_len=model.cfg.max_len, sampled_strategies=(), seed=seed,
                           beyond_accuracy=True, item_vectors=teacher_vectors,
                           desc=f"compression {position}/{len(models)} {name}")
        directory = directories[name]
        variant = json.loads((directory / VARIANT_FILE).read_text()) if (directory / VARIANT_FILE).exists() else {"kind": "fp32"}
        rows[name] = {
            "path": str(directory.relative_to(layout.root)) if directory.is_relative_to(layout.root) else str(directory),
            "kind": variant["kind"],
            **runtime_columns(model, cfg.throughput_batch_size),
            "ndcg@10": quality["full/NDCG@10"], "hr@10": quality["full/HR@10"],
            **{f"{metric.lower()}@10": quality[f"full/{metric}@10"] for metric in BEYOND_ACCURACY},
            "size_bytes": size_on_disk(directory),
            "parameters": parameter_count(model),
            "nonzero_parameters": nonzero_parameters(model),
            "bytes_per_item": item_table_bytes(directory) / (model.cfg.n_items + 1),
        }
        logger.info("compression %d/%d %s: NDCG@10 %.4f, %s bytes; %d users scored in %.1fs", position, len(models), name,
                    rows[name]["ndcg@10"], f"{rows[name]['size_bytes']:,}", len(histories), time.perf_counter() - started)
    timed_histories = histories[:timing_users] if timing_users else histories
    started = time.perf_counter()
    logger.info("timing %d models on %d users: %d interleaved rounds of %d requests each", len(models),
                len(timed_histories), ROUNDS, max(1, cfg.latency_requests // ROUNDS))
    timed = _timed({name: Recommender(model) for name, model in models.items()}, timed_histories, cfg)
    logger.info("CPU timing done in %.1fs", time.perf_counter() - started)
    if torch.cuda.is_available():
        started = time.perf_counter()
        cuda = _timed({name: Recommender(model, "cuda") for name, model in models.items()}, timed_histories, cfg)
        logger.info("CUDA timing done in %.1fs", time.perf_counter() - started)
        for name, values in cuda.items():
            timed[name].update({f"cuda_{key}": value for key, value in values.items() if key != "threads"})
    teacher = rows[TEACHER]
    for name, row in rows.items():
        row.update(timed[name])
        row["ndcg@10_change"] = row["ndcg@10"] / teacher["ndcg@10"] - 1 if teacher["ndcg@10"] else 0.0
        row["size_ratio"] = teacher["size_bytes"] / row["size_bytes"]
        row["latency_speedup"] = teacher["latency_p50_ms"] / row["latency_p50_ms"]
    return {"split": split, "device": "cpu", "threads": timed[TEACHER]["threads"], "users": len(histories),
            "timed_users": len(timed_histories), "teacher": TEACHER, "models": rows}


def markdown(report: dict) -> str:
    lines = [
        f"# Compression ({report['split']} split, {report['users']} users, {report['threads']} CPU threads)",
        "",
        *([f"**Not measured: compress.variants {report['missing_variants']} were not built** "
           f"(run `{COMPRESS_COMMAND}`, then evaluate again).", ""] if report.get("missing_variants") else []),
        "NDCG@10/HR@10 by full ranking; latency = one user per request, top-10 over the whole catalogue; "
        "throughput at the configured batch size; medians over interleaved rounds. Runtime: what computes the user "
        "vectors (\"onnx / torch\": ONNX Runtime at batch 1, PyTorch at the throughput batch; compress.runtime auto).",
        "",
        "| model | kind | runtime | NDCG@10 | change | HR@10 | size KiB | smaller | bytes/item | params | p50 ms | p95 ms | speed-up "
        "| users/s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in report["models"].items():
        lines.append(
            f"| {name} | {r['kind']} | {r['runtime']} | {r['ndcg@10']:.4f} | {r['ndcg@10_change']:+.2%} | {r['hr@10']:.4f} | "
            f"{r['size_bytes'] / 1024:,.1f} | {r['size_ratio']:.2f}x | {r['bytes_per_item']:.1f} | "
            f"{r['nonzero_parameters']:,} | {r['latency_p50_ms']:.3f} | {r['latency_p95_ms']:.3f} | "
            f"{r['latency_speedup']:.2f}x | {r['throughput_users_s']:,.0f} |")
    lines += [
        "",
        "Beyond accuracy on the top-10 lists: ILD@10 = 1 - mean pairwise cosine of the listed items in the teacher's "
        "item table (one space for every model); Novelty@10 = mean -log2 training popularity share; Coverage@10 = "
        "share of the catalogue listed; Gini@10 = Gini index of exposure over every item.",
        "",
        "| model | ILD@10 | Novelty@10 | Coverage@10 | Gini@10 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in report["models"].items():
        lines.append(f"| {name} | {r['ild@10']:.4f} | {r['novelty@10']:.3f} | {r['coverage@10']:.4f} | {r['gini@10']:.4f} |")
    return "\n".join(lines) + "\n"


def row_metrics(row: dict) -> dict[str, float]:
    """A model's figures as MLflow metric keys (no '@': ndcg@10 -> ndcg_at_10), the same for teacher and variants."""
    return {k.replace("@", "_at_"): float(v) for k, v in row.items() if isinstance(v, int | float)}


def _log_child_runs(report: dict, directories: dict[str, Path], tracking: TrackingConfig, layout: Layout,
                    parent_run_id: str | None) -> None:
    """One MLflow child run per variant under the training run; reruns update the same child runs."""
    from pipeline.core.tracking import mlflow_run, orchestrator_tags, param_value

    with mlflow_run(tracking, layout.root, "compression", run_id=parent_run_id, system_metrics=False) as parent:
        if parent is None:
            return
        import mlflow

        parent_id = parent.info.run_id
        mlflow.log_artifact(str(layout.reports_dir / REPORT_PNG), "reports")
        mlflow.log_artifact(str(layout.reports_dir / REPORT_MD), "reports")
        mlflow.log_dict(report, f"reports/{REPORT_JSON}")
        # The teacher's figures under its variants' keys, so the runs table compares the parent with its children.
        mlflow.log_metrics(row_metrics(report["models"][TEACHER]))
        client = mlflow.MlflowClient()
        for name, row in report["models"].items():
            if name == TEACHER:
                continue
            existing = client.search_runs([parent.info.experiment_id],
                                          filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`leanrec.variant` = '{name}'")
            run_id = existing[0].info.run_id if existing else None
            # experiment_id: a new child run would otherwise land in the default experiment, not beside its parent
            with mlflow.start_run(run_id=run_id, run_name=None if run_id else f"variant-{name}", nested=True,
                                  experiment_id=None if run_id else parent.info.experiment_id,
                                  tags={"leanrec.variant": name, "leanrec.kind": row["kind"], **({} if run_id else orchestrator_tags())},
                                  log_system_metrics=False) as child:
                mlflow.log_metrics(row_metrics(row))
                if run_id is None:
                    variant = json.loads((directories[name] / VARIANT_FILE).read_text())
                    mlflow.log_params({k: param_value(v) for k, v in variant.items() if k not in ("history", "fingerprint")})
                    mlflow.log_artifacts(str(directories[name]), "model")
                row["mlflow_run_id"] = child.info.run_id
        report["models"][TEACHER]["mlflow_run_id"] = parent_id


def check_variants(cfg: CompressConfig, layout: Layout, run_name: str) -> tuple[dict[str, Path], list[str]]:
    """`find_models`, warning about the variants not built: the report measures what exists."""
    directories, missing = find_models(cfg, layout, run_name)
    if missing:
        built = sorted(set(directories) - {TEACHER})
        logger.warning("%s; the compression report measures the teacher%s only", missing_variants_message(
            missing, layout, run_name), f" and {built}" if built else "")
    return directories, missing


def run_compression_report(cfg: CompressConfig, eval_cfg: EvaluateConfig, train_cfg: TrainConfig,
                           tracking: TrackingConfig, layout: Layout, seed: int,
                           found: tuple[dict[str, Path], list[str]] | None = None) -> dict:
    """The teacher and the configured variants that were built (`found`: `check_variants`' answer, when
    the caller checked before its own work); the variants not built are named in the log and the report
    (`missing_variants`), so that evaluate after train alone still reports the teacher."""
    from pipeline.core.tracking import read_run_id

    directories, missing = found if found is not None else check_variants(cfg, layout, train_cfg.run_name)
    report = measure_models(directories, layout, cfg, eval_cfg, seed)
    report["missing_variants"] = missing
    for row in report["models"].values():
        row["mlflow_run_id"] = None
    layout.reports_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(layout.reports_dir / REPORT_MD) as tmp:
        tmp.write_text(markdown(report), encoding="utf-8")
    pareto_chart(report, layout.reports_dir / REPORT_PNG)
    _log_child_runs(report, directories, tracking, layout, read_run_id(layout.model_dir(train_cfg.run_name)))
    write_json(report, layout.reports_dir / REPORT_JSON)
    logger.info("compression:\n%s", markdown(report))
    return report
