"""Stage `recommend`: top-K items for every known user with a registered model -> Parquet.

The model is the registered pyfunc's Servable (the CLI passes the champion, loaded from
the MLflow registry by `pipeline.registry.store.load_champion`), so the batch output is
exactly what the served model answers. Each user's whole known
history in the current features (every split) is the input, mapped to the
champion's vocabulary by raw item ID; seen items are excluded. With
`recommend.histories=champion` the users and histories are those registered with
the champion (the servable's own data): no features needed, only the registry
(what the scheduled Airflow DAG `leanrec_recommend` runs). With `recommend.diversity_weight` > 0
each user's top-K is re-ranked by MMR with that weight from the model's top CANDIDATES_PER_K x K
(pipeline/models/rerank.py, the same re-ranking the served model's `diversity` field applies): the
ranks follow MMR, the scores stay the model's. Users are scored in
batches of `recommend.batch_size` on CUDA when present, and the file appears only
when complete (atomic write).

Output `data/recommendations/recommendations.parquet`, one row per (user, rank):
user_id, rank (1 = best), item_id, score, source (`model`, or `popularity` for a
user none of whose items the champion knows). With `recommend.explain` two list
columns more: `because` (the raw IDs of the history items that most support the
item, best first: pipeline/models/explain.py, occlusion) and `because_weights` (the
drop of the item's score without each); empty for popularity rows.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.core.config import RecommendConfig
from pipeline.core.devices import select_device
from pipeline.core.errors import ServingError
from pipeline.core.io import Layout, parquet_stream, write_json
from pipeline.data.features import ITEM_VOCAB_FILE, SEQUENCES_FILE, USER_VOCAB_FILE
from pipeline.data.sequences import load_sequences
from pipeline.models.explain import explain_results
from pipeline.models.recommender import Recommender
from pipeline.serving.pyfunc import Servable

logger = logging.getLogger(__name__)

RECOMMENDATIONS_FILE = "recommendations.parquet"
REPORT = "recommend.json"


def recommendations_path(layout: Layout) -> Path:
    return layout.root / "data" / "recommendations" / RECOMMENDATIONS_FILE


def check_histories(cfg: RecommendConfig, layout: Layout) -> None:
    """Fail before any model is loaded when the histories to recommend for are not there."""
    if cfg.histories == "features" and not (layout.features_dir / SEQUENCES_FILE).exists():
        raise ServingError(f"{layout.features_dir} has no features: run the features stage first "
                           "(or set recommend.histories=champion)")


def _explanations(servable: Servable, histories: list[list[int]], results: list) -> dict[str, list]:
    """The `because` / `because_weights` columns of one batch, row for row with its (user, rank) rows."""
    because, weights = [], []
    for (indices, _, _), (ids, values) in zip(results, explain_results(servable.recommender, histories, results,
                                                                         servable.raw_ids), strict=True):
        for position in range(len(indices)):
            because.append(ids[position] if position < len(ids) else [])
            weights.append(values[position] if position < len(values) else [])
    return {"because": because, "because_weights": weights}


def run_recommend(cfg: RecommendConfig, servable: Servable, layout: Layout, *, model_name: str, version: str) -> dict:
    """Top-k for every user of the features (or of the histories registered with the model) -> Parquet + report.

    `servable` is the registered model (the registry's `load_champion` gives the champion's).
    """
    check_histories(cfg, layout)
    started = time.perf_counter()
    from_features = cfg.histories == "features"
    device = select_device(cfg.device, "recommend.device")
    servable.recommender = Recommender(servable.recommender.model, device)
    k = min(cfg.k, servable.n_items)

    if from_features:
        data = load_sequences(layout.features_dir)
        item_vocab = pq.read_table(layout.features_dir / ITEM_VOCAB_FILE).to_pandas()
        user_vocab = pq.read_table(layout.features_dir / USER_VOCAB_FILE).to_pandas()
        model_items, offsets = servable.index_map(item_vocab)[data.items], data.offsets
        user_ids = user_vocab.set_index("index")["id"].loc[data.users].to_numpy()
        id_type = pa.from_numpy_dtype(user_ids.dtype) if user_ids.dtype != object else pa.string()
    else:
        # The known users' histories registered with the champion, already in its item indices.
        model_items, offsets = servable._values.astype(np.int64), servable._offsets
        user_ids = np.array(list(servable.user_row), dtype=np.int64 if servable.user_ids_are_int else object)
        id_type = pa.int64() if servable.user_ids_are_int else pa.string()
    item_type = pa.int64() if servable.ids_are_int else pa.string()
    schema = pa.schema([("user_id", id_type), ("rank", pa.int16()), ("item_id", item_type),
                        ("score", pa.float32()), ("source", pa.string())])
    if cfg.explain:
        schema = schema.append(pa.field("because", pa.list_(item_type))).append(pa.field("because_weights", pa.list_(pa.float32())))

    n_users = len(user_ids)
    n_rows = 0
    sources = {"model": 0, "popularity": 0}
    target = recommendations_path(layout)
    with parquet_stream(target, schema) as writer:
        for start in tqdm(range(0, n_users, cfg.batch_size), total=-(-n_users // cfg.batch_size), desc="recommend",
                          unit="batch", disable=None):
            rows = range(start, min(start + cfg.batch_size, n_users))
            histories = []
            for row in rows:
                history = model_items[offsets[row] : offsets[row + 1]]
                histories.append(history[history > 0].tolist())
            results = servable.recommend_indices(histories, k, cfg.diversity_weight)
            batch = {"user_id": [], "rank": [], "item_id": [], "score": [], "source": []}
            for row, (indices, scores, source) in zip(rows, results, strict=True):
                sources[source] += 1
                batch["user_id"].extend([user_ids[row]] * len(indices))
                batch["rank"].extend(range(1, len(indices) + 1))
                batch["item_id"].extend(servable.raw_ids(indices))
                batch["score"].extend(scores)
                batch["source"].extend([source] * len(indices))
            if cfg.explain:
                batch.update(_explanations(servable, histories, results))
            writer.write_table(pa.table(batch, schema=schema))
            n_rows += len(batch["rank"])
    summary = {
        "model_name": model_name, "version": str(version), "histories": cfg.histories,
        "users": n_users, "rows": n_rows, "k": k, "diversity_weight": cfg.diversity_weight,
        "device": str(device), "sources": sources, "path": str(target.relative_to(layout.root)),
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_json(summary, layout.reports_dir / REPORT)
    logger.info("recommend: %d users x top-%d with %s version %s on %s -> %s", n_users, k, model_name, version, device, target)
    return summary
