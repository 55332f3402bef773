"""The servable model: any saved variant (teacher or compressed) with its vocabularies, as an MLflow pyfunc.

Request: a DataFrame, one row per request, with `user_id` (a known user: the
history comes from the features the model was registered with) or `history`
(a list of raw item IDs, oldest first), an optional `k` and an optional
`diversity` (0 to 1, default 0: off). Response: one row per request with the
top-K raw item IDs (`items`) and their `scores`, best first, never an item of
the history; with `diversity` > 0 the K are re-ranked by maximal marginal
relevance with that weight from the model's top 5K (pipeline/models/rerank.py),
in MMR order with the model's own scores. `source` says whether the model
(`model`) or the popularity fallback (`popularity`: an unknown user, or a
history with no known item) answered, and `unknown_items` counts the history
items that are not in the catalogue (they are ignored).

`explain: true` in a row adds `because` (per recommended item, the raw IDs of up
to 3 history items that most support it, best first: pipeline/models/explain.py)
and `because_weights` (the drop of the item's score without each); the columns
appear when any row asks, null for the others. A model registered with
pseudonymised users (ingest.pseudonymise_users) takes raw user IDs and hashes them
with the key from the server's environment (pipeline/data/pseudonym.py); it refuses
to load without that key.

A malformed request raises `MlflowException` with INVALID_PARAMETER_VALUE, so
`mlflow models serve` answers HTTP 400 with the message (`request.parse_request`:
unknown columns, types, `k`, the size limits).

This module imports only what the pyfunc needs (pandas, numpy, pyarrow, mlflow, pydantic,
and torch through `pipeline.models.recommender` when the model loads).
"""

from __future__ import annotations

import logging
import numbers
import shutil
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import pseudonym
from pipeline.serving import privacy
from pipeline.serving.request import parse_request

logger = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"  # the variant (or teacher) directory
DATA_ARTIFACT = "serving_data"  # vocabularies, popularity and known users' histories
ITEMS_FILE = "items.parquet"  # id, index, popularity (interactions in the features)
USERS_FILE = "users.parquet"  # id, items (the user's item indices, oldest first)
CHUNK = 512  # histories scored at once
# Packages the pyfunc imports; pinned to the versions installed where the model is logged.
REQUIREMENTS = ("mlflow", "torch", "torchao", "safetensors", "pandas", "pyarrow", "numpy", "numba", "pydantic")
ENCODER_REQUIREMENTS = ("onnxruntime",)  # added when the model directory holds an ONNX encoder
# The modules of `pipeline` the served model imports (tests/serving/test_pyfunc.py checks this against the
# import graph): the registered model ships only these, not the readers, validation, training or registry.
SERVED_MODULES = (
    "core/config.py", "core/errors.py", "core/io.py", "core/schema.py",
    "data/features.py", "data/pseudonym.py", "data/sequences.py",
    "models/coded.py", "models/codes.py", "models/explain.py", "models/onnx_encoder.py", "models/quantize.py",
    "models/recommender.py", "models/rerank.py", "models/sasrec.py", "models/scoring.py", "models/sparse.py",
    "models/topk_kernels.py", "models/variants.py", "serving/privacy.py", "serving/pyfunc.py", "serving/request.py",
)


def model_files(directory: Path) -> list[Path]:
    """The files `Recommender.load` reads from a teacher or variant directory (nothing else in it)."""
    from pipeline.models.onnx_encoder import ENCODER_FILE
    from pipeline.models.sasrec import CONFIG_FILE, WEIGHTS_FILE
    from pipeline.models.variants import VARIANT_FILE

    names = (CONFIG_FILE, WEIGHTS_FILE, VARIANT_FILE, ENCODER_FILE)
    files = [Path(directory) / name for name in names if (Path(directory) / name).is_file()]
    if not any(f.name == CONFIG_FILE for f in files):
        raise FileNotFoundError(f"{directory} holds no saved model ({CONFIG_FILE} missing)")
    return files


# ----------------------------------------------------------------------------- serving data


def build_serving_data(features_dir: Path, target: Path) -> Path:
    """items.parquet and users.parquet from a features directory (every split: serving sees all history)."""
    from pipeline.data.features import ITEM_VOCAB_FILE, USER_VOCAB_FILE
    from pipeline.data.sequences import load_sequences

    data = load_sequences(features_dir)
    item_vocab = pq.read_table(features_dir / ITEM_VOCAB_FILE).to_pandas()
    user_vocab = pq.read_table(features_dir / USER_VOCAB_FILE).to_pandas()
    counts = np.bincount(data.items, minlength=data.n_items + 1)
    items = pd.DataFrame({"id": item_vocab["id"].to_numpy(), "index": item_vocab["index"].to_numpy(np.int32),
                          "popularity": counts[item_vocab["index"].to_numpy()].astype(np.int64)})
    user_ids = pd.Series(user_vocab["id"].to_numpy(), index=user_vocab["index"].to_numpy())
    histories = pa.ListArray.from_arrays(pa.array(data.offsets.astype(np.int32)), pa.array(data.items.astype(np.int32)))
    users = pa.table({"id": pa.array(user_ids.loc[data.users].to_numpy()), "items": histories})
    target.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(items, preserve_index=False), target / ITEMS_FILE)
    pq.write_table(users, target / USERS_FILE)
    privacy.write_privacy(users, target)
    return target


class Servable:
    """A Recommender plus the raw-ID vocabularies: what both the pyfunc and batch recommendations call."""

    def __init__(self, recommender: Any, items: pd.DataFrame, users: pa.Table):
        self.recommender = recommender
        n_items = recommender.n_items
        if len(items) != n_items or set(items["index"]) != set(range(1, n_items + 1)):
            raise ValueError(f"the item vocabulary has {len(items)} entries but the model scores {n_items} items")
        self.ids_are_int = pd.api.types.is_integer_dtype(items["id"])
        order = np.argsort(items["index"].to_numpy())
        self.item_ids = items["id"].to_numpy()[order]  # position i -> raw id of index i + 1
        self.item_index = {self._key(v): int(i) for v, i in zip(items["id"].tolist(), items["index"].tolist(), strict=True)}
        self.popularity = np.zeros(n_items + 1, dtype=np.float64)
        self.popularity[items["index"].to_numpy()] = items["popularity"].to_numpy()
        self.popularity[0] = -np.inf
        column = users.column("items").combine_chunks()
        self._offsets = column.offsets.to_numpy()
        self._values = column.values.to_numpy()
        self.user_row = {self._key(v): row for row, v in enumerate(users.column("id").to_pylist())}
        self.user_ids_are_int = pa.types.is_integer(users.schema.field("id").type)
        self.pseudonymised = privacy.users_pseudonymised(users)  # request user IDs are hashed with the server's key
        self._item_vectors = None

    @classmethod
    def load(cls, model_dir: str | Path, data_dir: str | Path, device: str = "cpu") -> Servable:
        from pipeline.models.recommender import Recommender

        data_dir = Path(data_dir)
        return cls(Recommender.load(model_dir, device), pd.read_parquet(data_dir / ITEMS_FILE), pq.read_table(data_dir / USERS_FILE))

    @staticmethod
    def _key(value: Any) -> Any:
        return int(value) if isinstance(value, numbers.Integral) else value

    @property
    def n_items(self) -> int:
        return self.recommender.n_items

    def user_history(self, user_id: Any) -> np.ndarray | None:
        row = self.user_row.get(self._key(user_id))
        return None if row is None else self._values[self._offsets[row] : self._offsets[row + 1]]

    def item_indices(self, raw_items: Sequence[Any]) -> tuple[list[int], int]:
        """Known items' indices (in order) and how many were unknown."""
        known = [self.item_index.get(self._key(item)) for item in raw_items]
        indices = [i for i in known if i is not None]
        return indices, len(known) - len(indices)

    def item_vectors(self) -> Any:
        """The model's own item table as unit rows (CPU), what MMR measures similarity in; computed once."""
        if self._item_vectors is None:
            from pipeline.models.rerank import unit_rows

            self._item_vectors = unit_rows(self.recommender.model.item_weights()).cpu()
        return self._item_vectors

    def recommend_indices(self, histories: Sequence[Sequence[int]], k: int,
                          diversity: float = 0.0) -> list[tuple[list[int], list[float], str]]:
        """Top-k (indices, scores, source) per history of item indices; empty history: popularity.

        `diversity` > 0: the k are chosen by MMR with that weight from the model's top
        `rerank.candidate_count(k)` (pipeline/models/rerank.py), in MMR order with the model's scores.
        """
        out: list[tuple[list[int], list[float], str] | None] = [None] * len(histories)
        with_items = [i for i, h in enumerate(histories) if len(h)]
        top_k = min(k, self.n_items)
        if diversity > 0:
            from pipeline.models.recommender import MAX_K
            from pipeline.models.rerank import candidate_count, mmr_rerank

            n_candidates = candidate_count(top_k, min(MAX_K, self.n_items))
        for start in range(0, len(with_items), CHUNK):
            rows = with_items[start : start + CHUNK]
            batch = [list(histories[r]) for r in rows]
            if diversity > 0:
                candidates, candidate_scores = self.recommender.recommend(batch, k=n_candidates, exclude_seen=True)
                items, scores = mmr_rerank(candidates, candidate_scores, self.item_vectors(), top_k, diversity)
            else:
                items, scores = self.recommender.recommend(batch, k=top_k, exclude_seen=True)
            for row, row_items, row_scores in zip(rows, items.tolist(), scores.tolist(), strict=True):
                keep = [(i, s) for i, s in zip(row_items, row_scores, strict=True) if s != float("-inf")]
                out[row] = ([i for i, _ in keep], [s for _, s in keep], "model")
        empty = [i for i, h in enumerate(histories) if not len(h)]
        if empty:  # one popularity ranking for every history with no known item
            top = np.argsort(-self.popularity, kind="stable")[:k]
            top = top[np.isfinite(self.popularity[top])]
            fallback = (top.tolist(), self.popularity[top].tolist(), "popularity")
            for row in empty:
                out[row] = (list(fallback[0]), list(fallback[1]), fallback[2])
        return out  # type: ignore[return-value]

    def index_map(self, item_vocab: pd.DataFrame) -> np.ndarray:
        """Index in a features vocabulary (id, index) -> this model's index of the same raw ID; 0: unknown here."""
        mapping = np.zeros(int(item_vocab["index"].to_numpy().max(initial=0)) + 1, dtype=np.int64)
        mapping[item_vocab["index"].to_numpy()] = [self.item_index.get(self._key(i), 0) for i in item_vocab["id"].tolist()]
        return mapping

    def raw_ids(self, indices: Sequence[int]) -> list[Any]:
        return [self._key(v) for v in self.item_ids[np.asarray(indices, dtype=np.int64) - 1]] if len(indices) else []


# ----------------------------------------------------------------------------- the pyfunc


def answer(servable: Servable, requests: list[dict], key: bytes | None = None) -> pd.DataFrame:
    histories: list[list[int]] = []
    unknown_counts: list[int] = []
    for request in requests:
        if request["history"] is not None:
            indices, unknown = servable.item_indices(request["history"])
        else:
            # A model with pseudonymised users knows them by pseudonym: the raw ID is hashed with the server's key.
            lookup = pseudonym.pseudonymise([request["user_id"]], key)[0] if key is not None else request["user_id"]
            known = servable.user_history(lookup)
            indices, unknown = ([] if known is None else known.tolist()), 0
        histories.append(indices)
        unknown_counts.append(unknown)
    # One call per re-ranking: rows without it share the largest k (a top-k list's prefix is the smaller
    # top-k); rows with it are grouped by (diversity, k), as their candidates depend on k.
    groups: dict[tuple[float, int], list[int]] = {}
    for row, request in enumerate(requests):
        weight = request.get("diversity", 0.0)
        groups.setdefault((weight, request["k"] if weight > 0 else 0), []).append(row)
    results: list = [None] * len(requests)
    for (weight, _), rows in groups.items():
        found = servable.recommend_indices([histories[r] for r in rows], max(requests[r]["k"] for r in rows), weight)
        for row, result in zip(rows, found, strict=True):
            results[row] = result
    rows = []
    for request, unknown, (indices, scores, source) in zip(requests, unknown_counts, results, strict=True):
        k = request["k"]
        user_id = request["user_id"]
        rows.append({
            "user_id": None if user_id is None else str(user_id),
            "items": servable.raw_ids(indices[:k]),
            "scores": [float(s) for s in scores[:k]],
            "source": source,
            "unknown_items": unknown,
        })
    wanted = [r for r, request in enumerate(requests) if request.get("explain")]
    if wanted:  # only the rows asking for explanations pay for them; the others get null
        from pipeline.models.explain import explain_results

        because = explain_results(servable.recommender, [histories[r] for r in wanted], [results[r] for r in wanted],
                                  servable.raw_ids, [requests[r]["k"] for r in wanted])
        for row in rows:
            row["because"] = row["because_weights"] = None
        for r, (ids, weights) in zip(wanted, because, strict=True):
            rows[r]["because"], rows[r]["because_weights"] = ids, weights
    if sum(unknown_counts):
        logger.info("ignored %d unknown item(s) in %d request row(s)", sum(unknown_counts), len(requests))
    columns = ["user_id", "items", "scores", "source", "unknown_items"] + (["because", "because_weights"] if wanted else [])
    frame = pd.DataFrame(rows, columns=columns)
    # object dtype keeps None (JSON null) for history rows; a string column would hold NaN (invalid JSON).
    frame["user_id"] = pd.Series([row["user_id"] for row in rows], dtype=object)
    return frame


class LeanRecModel(mlflow.pyfunc.PythonModel):
    """Top-K raw item IDs for known users or raw histories; see the module docstring."""

    # No type hints on these two: MLflow would try to derive the signature from them.
    def load_context(self, context):  # noqa: ANN001, ANN201
        self.servable = Servable.load(context.artifacts[MODEL_ARTIFACT], context.artifacts[DATA_ARTIFACT])
        self.key = privacy.server_key(self.servable.pseudonymised, Path(context.artifacts[DATA_ARTIFACT]))

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        return answer(self.servable, parse_request(model_input, self.servable), getattr(self, "key", None))


def signature_and_example(servable: Servable) -> tuple[Any, pd.DataFrame]:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Schema

    id_type = DataType.long if servable.ids_are_int else DataType.string
    # No input schema: MLflow's schema enforcement keeps only the columns a schema names and drops the
    # rest with a log line, so a misspelt column (`K`) would silently fall back to the default. Without
    # one, `predict` sees every column and `parse_request` (RequestRow) refuses unknown ones with a 400
    # naming them, types each row (a request mixing user_id and history rows has missing values in every
    # column, which MLflow's long / array types reject) and gives messages naming the row.
    outputs = Schema([
        ColSpec(DataType.string, "user_id", required=False),
        ColSpec(Array(id_type), "items"),
        ColSpec(Array(DataType.double), "scores"),
        ColSpec(DataType.string, "source"),
        ColSpec(DataType.long, "unknown_items"),
        ColSpec(AnyType(), "because", required=False),
        ColSpec(AnyType(), "because_weights", required=False),
    ])
    history = servable.raw_ids(list(range(1, min(3, servable.n_items) + 1)))
    example = pd.DataFrame({"history": [history], "k": [5]})
    return ModelSignature(inputs=None, outputs=outputs), example


def served_code(target: Path) -> Path:
    """A copy of the `pipeline` package cut down to SERVED_MODULES (and their packages' __init__.py) at target/pipeline."""
    source = Path(__file__).resolve().parents[1]
    package = target / "pipeline"
    for relative in map(Path, SERVED_MODULES):
        for parent in relative.parents:  # the module's package, ..., the top package (".")
            init = package / parent / "__init__.py"
            if not init.exists():
                init.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source / parent / "__init__.py", init)
        shutil.copy2(source / relative, package / relative)
    return package


def log_servable(model_dir: Path, features_dir: Path, name: str = "model") -> Any:
    """Log the pyfunc (model directory + serving data) to the active run; returns MLflow's ModelInfo."""
    model_dir, features_dir = Path(model_dir), Path(features_dir)
    staging = Path(tempfile.mkdtemp(prefix="leanrec-serving-"))
    try:
        data_dir = build_serving_data(features_dir, staging / DATA_ARTIFACT)
        # Only the model's own files travel: the teacher directory also holds checkpoints and baselines.
        model_copy = staging / MODEL_ARTIFACT
        model_copy.mkdir()
        for file in model_files(model_dir):
            shutil.copy2(file, model_copy / file.name)
        servable = Servable.load(model_copy, data_dir)
        signature, example = signature_and_example(servable)
        from pipeline.models.onnx_encoder import ENCODER_FILE

        packages = REQUIREMENTS + (ENCODER_REQUIREMENTS if (model_copy / ENCODER_FILE).exists() else ())
        requirements = [f"{package}=={metadata.version(package)}" for package in packages]
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=LeanRecModel(),
            artifacts={MODEL_ARTIFACT: str(model_copy), DATA_ARTIFACT: str(data_dir)},
            code_paths=[str(served_code(staging / "code"))],
            signature=signature,
            input_example=example,
            pip_requirements=requirements,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
