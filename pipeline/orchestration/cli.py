"""Command line: `python -m pipeline <stage> [-S key=value ...]` runs one stage on params.yaml.

The CLI only wires configuration and paths to the stage functions; DVC and
Airflow call the same functions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config import DEFAULT_PARAMS_PATH, Params, load_params
from pipeline.core.errors import ConfigError, PipelineError
from pipeline.core.io import Layout

logger = logging.getLogger("pipeline")


def _ingest(params: Params, layout: Layout) -> Any:
    from pipeline.data.ingest import run_ingest

    return run_ingest(params.ingest, layout, seed=params.seed)


def _validate(params: Params, layout: Layout) -> Any:
    from pipeline.data.validation import run_validate

    return run_validate(params.validate_, layout, engine=params.data_engine, spark=params.spark)


def _drift(params: Params, layout: Layout) -> Any:
    from pipeline.data.drift import run_drift

    if not params.drift.reference:
        raise ConfigError("the drift stage compares with reference interactions: set drift.reference (a Parquet file)")
    return run_drift(params.drift, layout, params.drift.reference)


def _reference(params: Params, stage: str) -> str:
    if not params.drift.reference:
        raise ConfigError(f"the {stage} stage compares with reference interactions: set drift.reference (a Parquet file)")
    return params.drift.reference


def _select_new(params: Params, layout: Layout) -> Any:
    """Incremental runs: keep only the ingested rows drift.reference does not hold."""
    from pipeline.data.incremental import select_new

    result = select_new(layout, _reference(params, "select-new"))
    return {**vars(result), "empty": result.empty}


def _merge_reference(params: Params, layout: Layout) -> Any:
    """Incremental runs: validated interactions := drift.reference + the new validated rows."""
    from pipeline.data.incremental import merge_with_reference

    return {"rows": merge_with_reference(layout, _reference(params, "merge-reference"))}


def _features(params: Params, layout: Layout) -> Any:
    from pipeline.data.features_outofcore import run_features_on

    return run_features_on(params.data_engine, params.features, layout, params.spark)


def _train(params: Params, layout: Layout, resume: bool = False) -> Any:
    from pipeline.training.train import run_train

    result = run_train(params.train, params.tracking, layout, seed=params.seed, resume=resume,
                       eval_batch_size=params.evaluate.batch_size)
    return {k: v for k, v in vars(result).items() if k != "history"}


def _evaluate(params: Params, layout: Layout) -> Any:
    from pipeline.evaluation.evaluate import markdown_table, run_evaluate

    report = run_evaluate(params.evaluate, params.train, params.tracking, layout, seed=params.seed,
                          compress_cfg=params.compress)
    logger.info("test metrics:\n%s", markdown_table(report["models"]))
    summary = {name: {k: v for k, v in metrics.items() if k.startswith("full/")} for name, metrics in report["models"].items()}
    if "compression" in report:
        summary["compression"] = {name: {k: row[k] for k in ("ndcg@10", "size_bytes", "latency_p50_ms")}
                                  for name, row in report["compression"]["models"].items()}
    return summary


def _compress(params: Params, layout: Layout, variant: str | None = None) -> Any:
    """Every variant in params (DVC, CLI), or one (`variant`: one mapped Airflow task each)."""
    from pipeline.compression.compress import compress_variant, run_compress

    if variant is not None:
        return compress_variant(params.compress, layout, params.train.run_name, variant, seed=params.seed, train_cfg=params.train)
    return run_compress(params.compress, layout, params.train.run_name, seed=params.seed, train_cfg=params.train)


def _register(params: Params, layout: Layout) -> Any:
    """Register the policy's pick, then reports/summary.json: the headline figures with the chosen model."""
    from pipeline.evaluation.summary import write_summary
    from pipeline.registry.register import register

    result = register(params.registry, params.tracking, layout)
    write_summary(layout, result["candidate"])
    return result


def _promote(params: Params, layout: Layout, model_version: str | None = None) -> Any:
    from pipeline.registry.promote import promote

    return promote(params.registry, params.tracking, layout, version=model_version, seed=params.seed)


def _rollback(params: Params, layout: Layout) -> Any:
    from pipeline.registry.promote import rollback

    return rollback(params.registry, params.tracking, layout)


def _champion_history(params: Params, layout: Layout) -> Any:
    from pipeline.registry.store import champion_periods, registry_client

    periods = champion_periods(registry_client(params.tracking, layout.root), params.registry.model_name)
    for entry in periods["history"]:
        logger.info("version %s: champion from %s until %s (%s)", entry["version"], entry.get("at"),
                    entry["until"] or "now", entry.get("event"))
    return periods


def _recommend(params: Params, layout: Layout) -> Any:
    from pipeline.registry.store import load_champion
    from pipeline.serving.batch import check_histories, run_recommend

    check_histories(params.recommend, layout)  # before the champion is downloaded
    servable, version = load_champion(params.registry, params.tracking, layout.root)
    return run_recommend(params.recommend, servable, layout, model_name=params.registry.model_name, version=version)


def _explain(params: Params, layout: Layout, user_id: str | None = None, k: int | None = None) -> Any:
    """The champion's top-k for one known user, each item with the history items that most support it."""
    from pipeline.models.explain import explain
    from pipeline.registry.store import load_champion

    if user_id is None:
        raise ConfigError("explain needs --user-id (a user known to the champion)")
    k = params.recommend.k if k is None else k
    if k < 1:
        raise ConfigError(f"--k must be at least 1, got {k}")
    servable, version = load_champion(params.registry, params.tracking, layout.root)
    key: Any = user_id
    if servable.pseudonymised:
        from pipeline.data.pseudonym import load_key, pseudonymise

        key = pseudonymise([user_id], load_key())[0]
    elif servable.user_ids_are_int:
        if not user_id.lstrip("-").isdigit():
            raise ConfigError(f"the champion's user IDs are integers, got --user-id {user_id!r}")
        key = int(user_id)
    history = servable.user_history(key)
    if history is None:
        raise ConfigError(f"user {user_id!r} is not among the champion's {len(servable.user_row)} known users")
    history = history.tolist()
    ((indices, scores, source),) = servable.recommend_indices([history], min(k, servable.n_items))
    (because,) = explain(servable.recommender, [history], [indices])
    return {
        "user_id": user_id, "model_name": params.registry.model_name, "version": str(version), "source": source,
        "recommendations": [
            {"item_id": item, "score": score,
             "because": [{"item_id": servable.raw_ids([i])[0], "weight": round(w, 6)} for i, w in supporting]}
            for item, score, supporting in zip(servable.raw_ids(indices), scores, because, strict=True)
        ],
    }


def _show_params(params: Params, layout: Layout) -> Any:
    return params.model_dump(mode="json", by_alias=True)


def _config_reference(params: Params, layout: Layout) -> Any:
    from pipeline.orchestration.config_reference import reference_markdown

    sys.stdout.write(reference_markdown())
    return None


STAGES: dict[str, Callable[[Params, Layout], Any]] = {
    "ingest": _ingest,
    "validate": _validate,
    "select-new": _select_new,
    "drift": _drift,
    "merge-reference": _merge_reference,
    "features": _features,
    "train": _train,
    "compress": _compress,
    "evaluate": _evaluate,
    "register": _register,
    "promote": _promote,
    "rollback": _rollback,
    "champion-history": _champion_history,
    "recommend": _recommend,
    "explain": _explain,
    "show-params": _show_params,
    "config-reference": _config_reference,
}


def _summary(result: Any) -> Any:
    if is_dataclass(result):
        return {k: v for k, v in asdict(result).items() if not isinstance(v, list | dict) or len(json.dumps(v, default=str)) < 2000}
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="Run one LeanRec stage.")
    parser.add_argument("stage", choices=sorted(STAGES), help="stage to run")
    parser.add_argument("--params", default=str(DEFAULT_PARAMS_PATH), help="params file (default: %(default)s)")
    parser.add_argument("--workdir", default=".", help="root of data/, models/, reports/ (default: current dir)")
    parser.add_argument(
        "-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a params key, e.g. -S ingest.synthetic.n_interactions=1000000 (repeatable)",
    )
    parser.add_argument("--resume", action="store_true", help="train: continue from the last checkpoint")
    parser.add_argument("--model-version", help="promote: gate this registered version instead of the challenger")
    parser.add_argument("--user-id", help="explain: the (raw) user ID whose recommendations to explain")
    parser.add_argument("--k", type=int, help="explain: items to recommend and explain (default: recommend.k)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Great Expectations must never try to reach the network from a pipeline run.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    try:
        params = load_params(args.params, args.overrides)
        if args.resume and args.stage != "train":
            raise ConfigError("--resume only applies to the train stage")
        if args.model_version is not None and args.stage != "promote":
            raise ConfigError("--model-version only applies to the promote stage")
        if (args.user_id is not None or args.k is not None) and args.stage != "explain":
            raise ConfigError("--user-id and --k only apply to the explain command")
        stage_kwargs: dict[str, Any] = {"resume": True} if args.resume else {}
        if args.stage == "explain":
            stage_kwargs.update(user_id=args.user_id, k=args.k)
        if args.model_version is not None:
            stage_kwargs["model_version"] = args.model_version
        result = STAGES[args.stage](params, Layout(Path(args.workdir)), **stage_kwargs)
    except PipelineError as err:
        logger.error("%s failed: %s", args.stage, err)
        return err.exit_code
    if result is not None:
        json.dump(_summary(result), sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    return 0
