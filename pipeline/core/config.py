"""Typed configuration: `params.yaml` parsed into pydantic models.

`params.yaml` is the single source of configuration. CLI flags and DAG params
override keys of it (`-S ingest.synthetic.n_interactions=1000000`); they never
add a second config. Unknown keys and wrong types fail at start with a message
that names the key.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.core.errors import ConfigError

DEFAULT_PARAMS_PATH = Path("params.yaml")


def _not_only_dots(name: str) -> str:
    if not name.strip("."):  # "." and ".." are the directory itself and its parent, not a name in it
        raise ValueError(f"{name!r} names no directory of its own: use letters, digits, '_', '-' (and '.' inside a name)")
    return name


# A name that becomes one path component (models/<run_name>/): no separators, not "." or "..".
PathName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$"), AfterValidator(_not_only_dots)]


class _Strict(BaseModel):
    # extra="forbid": an unknown (misspelt) key is an error, not silently ignored.
    # strict=True: "5" is not accepted where an int is declared.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SyntheticConfig(_Strict):
    """Seeded generator of implicit-feedback sequences (see pipeline/data/sources/synthetic.py)."""

    n_interactions: int = Field(60_000, ge=1_000, le=100_000_000)
    n_items: int = Field(1_000, ge=20)
    mean_sequence_length: float = Field(50.0, ge=3.0)
    n_topics: int = Field(20, ge=1)
    popularity_exponent: float = Field(1.0, ge=0.0, description="Zipf exponent of item popularity")
    sequential_strength: float = Field(0.5, ge=0.0, le=1.0, description="probability the next item follows from the last one")
    noise_rate: float = Field(0.05, ge=0.0, le=1.0, description="share of random, low-rated interactions")
    # Dates accept ISO strings too (strict=False on the field only): YAML and CLI overrides give either.
    start_date: dt.date = Field(dt.date(2023, 1, 1), strict=False)
    span_days: int = Field(365, ge=1)
    chunk_users: int = Field(20_000, ge=100, description="users generated per chunk (bounds memory)")


class MovieLensConfig(_Strict):
    path: str = Field("../shared/data/ml-100k", description="a directory, or a u.data / ratings.dat / ratings.csv file")
    variant: Literal["auto", "ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "ml-32m"] = "auto"
    download: bool = Field(False, description="fetch the official archive (MD5-checked) when the data is missing")
    base_url: str = "https://files.grouplens.org/datasets/movielens"


class ColumnMapping(_Strict):
    user: str = "user_id"
    item: str = "item_id"
    timestamp: str | None = Field("timestamp", description="null: no timestamp column, the file's row order is the time")
    rating: str | None = None
    event: str | None = None


class FileConfig(_Strict):
    path: str | None = Field(None, description="CSV (.csv.gz), .inter or Parquet file or directory; a path or URI (s3://bucket/logs/)")
    format: Literal["auto", "csv", "inter", "parquet"] = Field("auto", description="auto: from the file extension")
    sep: str = ","
    header: bool = True
    columns: ColumnMapping = ColumnMapping()
    id_type: Literal["int", "str"] = Field("str", description="int: non-numeric ids are quarantined")
    timestamp_unit: Literal["auto", "s", "ms", "us", "ns", "datetime"] = Field("auto", description="auto: epoch unit from the "
                                                                                "magnitude of the values, or ISO date-times")
    event_weights: dict[str, float] | None = Field(None, description="event type -> weight, with columns.event")


class IngestConfig(_Strict):
    source: Literal["synthetic", "movielens", "file"] = Field("synthetic", description="where interactions come from")
    synthetic: SyntheticConfig = SyntheticConfig()
    movielens: MovieLensConfig = MovieLensConfig()
    file: FileConfig = FileConfig()
    pseudonymise_users: bool = Field(False, description="replace user IDs by keyed HMAC-SHA256 pseudonyms as they "
                                     "are read; the key comes from env LEANREC_PSEUDONYM_KEY or LEANREC_PSEUDONYM_KEY_FILE")


class ValidateConfig(_Strict):
    min_rows: int = Field(1_000, ge=0, description="fewer rows fail the batch")
    min_timestamp: dt.datetime = Field(dt.datetime(1995, 1, 1, tzinfo=dt.UTC), strict=False)
    future_tolerance_s: int = Field(3600, ge=0, description="clock skew allowed beyond 'now'")
    rating_min: float = Field(0.0, description="ratings outside [rating_min, rating_max] are quarantined")
    rating_max: float = 5.0
    max_quarantine_share: float = Field(0.05, ge=0.0, le=1.0, description="a larger quarantined share fails the batch")
    data_docs: bool = Field(True, description="build Great Expectations Data Docs under reports/data_docs")

    @model_validator(mode="after")
    def _check_range(self) -> ValidateConfig:
        if self.rating_min > self.rating_max:
            raise ValueError("rating_min must be <= rating_max")
        return self


class SplitConfig(_Strict):
    strategy: Literal["leave_one_out", "temporal"] = Field(
        "leave_one_out", description="last item test, second to last valid; or one global time cut-off")
    valid_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="temporal only")
    test_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="temporal only")


class FeaturesConfig(_Strict):
    min_rating: float | None = Field(3.0, description="implicit-feedback threshold on explicit ratings; a source whose rows "
                                     "all share one rating (a file without a rating column) keeps every row; null keeps all")
    dedupe: Literal["first", "last", "none"] = Field("first", description="which repeat of a (user, item) pair to keep")
    min_user_interactions: int = Field(5, ge=1)
    min_item_interactions: int = Field(5, ge=1)
    max_kcore_iterations: int = Field(50, ge=1)
    vocab_from: str | None = Field(None, description="features dir whose vocabularies are extended, not renumbered")
    split: SplitConfig = SplitConfig()


class CurriculumConfig(_Strict):
    """Progressive optimisation: train on short suffixes first, growing to max_len."""

    enabled: bool = False
    start_len: int = Field(10, ge=2)
    epochs: int = Field(3, ge=1, description="epochs over which the length grows to max_len")


class BPRConfig(_Strict):
    dim: int = Field(64, ge=1)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(4096, ge=1)
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(1e-5, ge=0)


class TrainConfig(_Strict):
    model: Literal["sasrec", "popularity", "bpr"] = Field("sasrec", description="the model this run trains")
    preset: Literal["small", "medium", "large"] = Field("small", description="SASRec shape; the keys below override it")
    # Optional shape overrides of the preset (null keeps the preset's value).
    d_model: int | None = Field(None, ge=8)
    n_layers: int | None = Field(None, ge=1)
    n_heads: int | None = Field(None, ge=1)
    max_len: int | None = Field(None, ge=2)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    loss: Literal["auto", "full_softmax", "chunked_softmax", "sampled_softmax"] = Field(
        "auto", description="auto: full_softmax up to chunked_softmax_above_items items, chunked_softmax above, sampled_softmax "
        "above sampled_softmax_above_items; chunked_softmax: the exact full softmax a block of tokens at a time (memory bounded "
        "by the block); sampled_softmax: log-Q corrected, for catalogues too large for any full softmax")
    chunked_softmax_above_items: int = Field(1_000, ge=1, description="loss=auto: chunked_softmax above this many items")
    sampled_softmax_above_items: int | None = Field(30_000, ge=1, description="loss=auto: sampled_softmax above this many "
                                                    "items; null: never (docs/benchmarks.md: both thresholds measured)")
    loss_block_logits: int = Field(52_428_800, ge=1, description="chunked_softmax only: logits held at once (tokens x catalogue)")
    n_negatives: int = Field(256, ge=1, description="sampled_softmax only")
    sparse_item_updates: bool = Field(False, description="sampled_softmax and weight_decay=0 only: the item table's "
                                      "touched rows updated by SparseAdam, AdamW for the rest")
    embedding_engine: Literal["torch", "torchrec"] = Field(
        "torch", description="torchrec: the item table row-wise sharded over the torchrun ranks (pipeline/training/sharded.py); "
                             "no rank holds the whole table, so it trains with loss sampled_softmax only")
    sharded_table_lr: float = Field(0.1, gt=0, description="embedding_engine=torchrec only: the learning rate of the table's "
                                    "fused Adagrad (train.lr, AdamW's, moves it far too little: docs/benchmarks.md)")
    early_stopping_patience: int = Field(3, ge=1, description="epochs without a better valid NDCG@10")
    validation_users: int | None = Field(None, ge=1, description="validate each epoch on a seeded sample of N users; null: all")
    curriculum: CurriculumConfig = CurriculumConfig()
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 on CUDA, fp32 on CPU")
    compile: bool = Field(False, description="torch.compile the training step")
    num_threads: int | None = Field(None, ge=1, description="CPU threads; null lets torch decide")
    baselines: list[Literal["popularity", "bpr"]] = Field(["popularity", "bpr"], description="trained beside the model")
    bpr: BPRConfig = BPRConfig()
    run_name: PathName = Field("main", description="models/<run_name>/")
    init_from: str | None = Field(None, description="warm start: a SASRec model dir (models/<run>) whose weights initialise "
                                  "this run; its item table grows for new items, old indices keep their rows (features with vocab_from)")

    @model_validator(mode="after")
    def _check_item_table(self) -> TrainConfig:
        sampled, torchrec = self.loss == "sampled_softmax", self.embedding_engine == "torchrec"
        for broken, why in (
            (self.sparse_item_updates and not sampled, f"sparse_item_updates needs loss=sampled_softmax (got {self.loss!r}): "
             "full and chunked softmax give every item row a gradient on every step"),
            (self.sparse_item_updates and self.weight_decay > 0, "sparse_item_updates: SparseAdam has no weight decay; set weight_decay=0"),
            (torchrec and not sampled, f"embedding_engine=torchrec needs loss sampled_softmax (got {self.loss}): a row-wise "
             "sharded item table has no full-catalogue softmax"),
            (torchrec and self.sparse_item_updates, "embedding_engine=torchrec updates its table with its own fused optimizer: "
             "set sparse_item_updates=false")):
            if broken:
                raise ValueError(why)
        return self


class EvaluateConfig(_Strict):
    ks: list[Annotated[int, Field(ge=1)]] = Field(
        [10, 20, 50], min_length=1, description="cut-offs of HR/NDCG/Recall/Coverage; at most the catalogue's items")
    batch_size: int = Field(512, ge=1)
    sampled_negatives: int = Field(100, ge=1, description="negatives of the sampled (paper) protocols")
    sampled_strategies: list[Literal["uniform", "popularity"]] = ["uniform", "popularity"]


VariantName = Literal["fp32", "fp16", "bf16", "int8", "int4", "pruned", "distilled", "lowrank", "distilled+int8", "pq",
                      "pq+int8"]
# Variants that train (fine-tune or distil) and so want the GPU; the others are seconds of CPU work.
TRAINED_VARIANTS = ("pruned", "distilled", "distilled+int8", "lowrank", "pq", "pq+int8")


class PruningConfig(_Strict):
    structured_sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="share of attention heads and FFN channels removed")
    unstructured_sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="share of the remaining weights zeroed, by magnitude")
    finetune_epochs: int = Field(3, ge=0)
    lr: float = Field(5e-4, gt=0)


class DistillConfig(_Strict):
    # Defaults measured on the default data (docs/benchmarks.md): a student as wide as the teacher with one block,
    # started from the teacher's weights, reached its test NDCG@10 (+0.2%, early-stopped after 4 epochs); the
    # former d=32, 1-head student started from the SVD-projected table lost 14% in 10 epochs.
    d_model: int | None = Field(None, ge=8, description="student width; null: the teacher's")
    n_layers: int = Field(1, ge=1, description="student depth")
    n_heads: int | None = Field(None, ge=1, description="null: the teacher's")
    epochs: int = Field(10, ge=1)
    lr: float = Field(2e-3, gt=0)
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the true next item; 1 - alpha on the teacher's KL")
    top_k: int | None = Field(None, ge=1, description="KL over the teacher's top-k items; null: the whole catalogue")
    init_from_teacher: bool = Field(
        True, description="start from the teacher: its weights and first n_layers blocks when as wide, else its table SVD-projected")


class LowRankConfig(_Strict):
    rank: int = Field(16, ge=1, description="rank of the factorised item table")
    finetune_epochs: int = Field(3, ge=0, description="without fine-tuning a low-rank table loses most of the quality")
    lr: float = Field(5e-4, gt=0)


class PQConfig(_Strict):
    """Item codes (product quantization): each item is one uint8 code in each of n_subspaces codebooks."""

    n_subspaces: int = Field(32, ge=1, description="codes per item; must divide d_model (d_model / n_subspaces dims each); "
                             "capped at d_model; 32 keeps the default data within 1% of the teacher, 16 loses 3.7% (docs/benchmarks.md)")
    codebook_size: int = Field(
        256, ge=2, le=256, description="centroids per sub-space, code 0 reserved for padding; capped at the "
        "catalogue's rows (n_items + 1) so a small catalogue works")
    finetune_epochs: int = Field(10, ge=0, description="codebooks and Transformer fine-tuned with the codes fixed, "
                                 "with the teacher's loss")
    lr: float = Field(2e-3, gt=0)


class CompressConfig(_Strict):
    variants: list[VariantName] = Field(
        ["fp32", "fp16", "bf16", "int8", "int4", "pruned", "distilled", "distilled+int8", "pq", "pq+int8"],
        description="variants built from the trained teacher into models/<run>/variants/<name>/ (fp32: its weights as they "
                    "are; lowrank is not a default: item codes compress the table further at less loss)")
    runtime: Literal["auto", "onnx", "torch"] = Field(
        "torch", description="onnx: each variant also gets encoder.onnx, its user vectors on ONNX Runtime on CPU (int8 MatMuls "
                             "for int8, int4, distilled+int8; the graph only, its weights from model.safetensors); auto: the same, "
                             "used for batches of up to encoder_max_batch users, PyTorch above; torch: PyTorch only")
    encoder_max_batch: int = Field(16, ge=1, description="runtime auto: the largest batch on ONNX Runtime (1 thread; docs/benchmarks.md)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="for fine-tuning and distillation")
    batch_size: int = Field(128, ge=1)
    patience: int = Field(3, ge=1, description="fine-tune/distill epochs without a better valid NDCG@10")
    pruning: PruningConfig = PruningConfig()
    distill: DistillConfig = DistillConfig()
    lowrank: LowRankConfig = LowRankConfig()
    pq: PQConfig = PQConfig()
    latency_requests: int = Field(200, ge=10, description="batch-1 requests timed per model (after warm-up)")
    throughput_batch_size: int = Field(256, ge=1)
    threads: int | None = Field(None, ge=1, description="CPU threads while the evaluate stage times the models; null: all cores torch sees")


class TrackingConfig(_Strict):
    # null: $MLFLOW_TRACKING_URI if set, else a SQLite store inside the work dir.
    tracking_uri: str | None = None
    experiment: str = Field("leanrec", description="MLflow experiment name")
    enabled: bool = Field(True, description="false: log nothing to MLflow")


class DriftConfig(_Strict):
    """Checks of new interactions against reference data (pipeline/data/drift.py), for incremental runs."""

    max_new_user_share: float = Field(0.9, ge=0.0, le=1.0, description="share of the batch's users unseen in the reference")
    max_new_item_share: float = Field(0.5, ge=0.0, le=1.0, description="share of the batch's items unseen in the reference")
    max_popularity_tv: float = Field(
        0.5, ge=0.0, le=1.0, description="total-variation distance between reference and batch item popularity")
    max_popularity_psi: float = Field(0.25, ge=0.0, description="population stability index over popularity buckets")
    psi_buckets: int = Field(10, ge=2, le=1000, description="popularity buckets of equal reference mass (PSI)")
    action: Literal["fail", "warn"] = Field("fail", description="what a failed check does: stop the run, or log a warning")
    reference: str | None = Field(
        None, description="reference interactions (Parquet with user_id, item_id), e.g. the validated "
        "interactions the champion was trained on; the drift stage needs it")


class PolicyConfig(_Strict):
    """How `register` picks the candidate among the teacher and its compressed variants."""

    metric: Literal["ndcg@10", "hr@10"] = Field("ndcg@10", description="quality measure the candidates are ranked by")
    tolerance: float = Field(0.01, ge=0.0, lt=1.0, description="candidates within this share of the best metric count as "
                             "equal: the fastest of them wins (then the smallest), so noise never picks a slower model")
    max_latency_p50_ms: float | None = Field(50.0, gt=0, description="CPU p50 latency budget per request; null: no budget")
    max_size_bytes: int | None = Field(None, ge=1, description="size budget on disk; null: no budget")
    min_latency_speedup: float | None = Field(
        1.0, gt=0,
        description="batch-1 CPU latency speed-up over the teacher a candidate needs (1.0: never slower than the teacher); null: none")
    candidates: list[str] = Field([], description="models of reports/compression.json to consider; empty: all")


class RegistryConfig(_Strict):
    model_name: str = Field("leanrec", pattern=r"^[A-Za-z0-9_.-]+$", description="registered model name")
    policy: PolicyConfig = PolicyConfig()
    ndcg_tolerance: float = Field(
        0.01, ge=0.0, lt=1.0,
        description="promote unless the challenger's NDCG@10 is below the champion's by more than this share")
    allow_promotion: bool = Field(True, description="false: promote gates and reports, but never moves the champion")
    min_history_agreement: float = Field(
        0.9, ge=0.0, le=1.0, description="share of the champion's history items the test users still have; below it (or "
        "with no test user known to the champion) the data differ and the gate refuses; 0: check the catalogue only")
    min_target_coverage: float = Field(0.5, ge=0.0, le=1.0,
                                       description="share of the test targets the champion must know for a comparable gate")
    lock_timeout_s: float = Field(1800.0, gt=0, description="wait this long for a concurrent promotion; a lock twice as old is stale")


class RecommendConfig(_Strict):
    k: int = Field(10, ge=1, le=1000, description="items per user")
    diversity_weight: float = Field(0.0, ge=0.0, le=1.0, description="MMR re-ranking of the model's top CANDIDATES_PER_K x k "
                                    "candidates (pipeline/models/rerank.py): weight of similarity to the items above vs relevance; 0: off")
    batch_size: int = Field(1024, ge=1)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present")
    histories: Literal["features", "champion"] = Field(
        "features", description="users and histories to recommend for: features (data/features of the work dir, "
        "mapped to the champion's items) or champion (the known users' histories registered with the champion)")
    explain: bool = Field(False, description="add each item's top supporting history items and weights (list columns)")


class SparkConfig(_Strict):
    master: str = Field("local[*]", description="local[N], or an existing cluster: spark://host:7077, k8s://https://host:443, yarn")
    driver_memory: str = Field("4g", description="spark.driver.memory (the driver collects the sorted rows it writes)")
    conf: dict[str, str] = Field({}, description="more Spark settings, e.g. spark.sql.shuffle.partitions, spark.hadoop.fs.s3a.*")


class Params(_Strict):
    seed: int = Field(42, description="seeds data generation, batch order and initialisation")
    data_engine: Literal["pandas", "duckdb", "spark"] = Field("pandas", description="validate and features in memory (pandas), "
                                                              "out of core (duckdb: bounded memory, spills to disk) or on Spark")
    spark: SparkConfig = SparkConfig()
    ingest: IngestConfig = IngestConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    features: FeaturesConfig = FeaturesConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    compress: CompressConfig = CompressConfig()
    tracking: TrackingConfig = TrackingConfig()
    drift: DriftConfig = DriftConfig()
    registry: RegistryConfig = RegistryConfig()
    recommend: RecommendConfig = RecommendConfig()

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)


def _set_dotted(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    node = tree
    parts = dotted_key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted_key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` with the value parsed as YAML (so `5` is an int, `null` is None)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from err
    return key.strip(), value


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for problem in err.errors():
        key = ".".join(str(p) for p in problem["loc"]) or "<root>"
        if problem["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {problem['msg']} (got {problem.get('input')!r})")
    return "\n".join(lines)


def params_from_dict(raw: dict[str, Any] | None, overrides: list[str] | None = None, source: str = "params") -> Params:
    tree = dict(raw or {})
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        return Params.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_params(path: str | Path = DEFAULT_PARAMS_PATH, overrides: list[str] | None = None) -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return params_from_dict(raw, overrides, source=str(path))
