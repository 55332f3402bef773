"""Stage `compress`: the trained teacher -> smaller variants in models/<run>/variants/<name>/.

Each variant is one call of `compress_variant`, independent of the others, so
Airflow can map one task per variant; `run_compress` builds every variant that
params list (what DVC and the CLI run). Every variant directory loads through
`pipeline.models.variants.load_variant` / `pipeline.models.recommender.Recommender`.

    fp32              the teacher's weights as they are (with runtime onnx: the teacher on ONNX Runtime)
    fp16, bf16        half-precision weights
    int8              torchao int8 Linear layers + row-wise int8 item table
    int4              torchao int8 Linear layers + row-wise int4 item table
    pruned            structured (heads, FFN channels) + unstructured magnitude pruning, fine-tuned,
                      stored narrowed and sparse
    distilled         a shallower, narrower student trained on the teacher's outputs
    lowrank           item table factorised by truncated SVD, optionally fine-tuned
    distilled+int8    the distilled student in int8
    pq                item table as product-quantized item codes (m uint8 codes per item into m shared
                      codebooks, k-means on the teacher's table), codebooks and Transformer fine-tuned
    pq+int8           the fine-tuned pq model with int8 codebooks

With `compress.runtime: onnx` every variant directory also holds `encoder.onnx`: the variant's
user-vector computation for ONNX Runtime on CPU (pipeline/models/onnx_encoder.py), fp32, or with
int8 MatMuls for the int8 variants; the graph only, its weights supplied from the variant's
model.safetensors when `load_variant` loads it on CPU. With `compress.runtime: auto` the same file is
built and variant.json records `encoder_max_batch`: batches up to it run on ONNX Runtime (less
per-op overhead), larger ones on PyTorch (fused attention), behind the same `Recommender`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.compression.distill import build_student, distillation_loss
from pipeline.compression.pruning import apply_masks, magnitude_masks, prune_structured, sparsity_of
from pipeline.core.config import CompressConfig, TrainConfig
from pipeline.core.devices import select_device
from pipeline.core.errors import CompressError
from pipeline.core.io import Layout
from pipeline.core.tracking import directory_sha256
from pipeline.data.sequences import SequenceData, load_sequences
from pipeline.models.coded import code_teacher
from pipeline.models.onnx_encoder import ENCODER_FILE
from pipeline.models.sasrec import WEIGHTS_FILE, SASRec, load_model
from pipeline.models.variants import (
    ENCODER_MAX_BATCH_KEY,
    VARIANT_FILE,
    LowRankSASRec,
    export_variant_encoder,
    factorise,
    load_variant,
    save_variant,
    size_on_disk,
    variants_dir,
)
from pipeline.training.checkpoint import NOT_TEACHER_KEYS, config_differences
from pipeline.training.engine import Engine, EngineSettings, Hooks
from pipeline.training.losses import LossFn, next_item_loss, plain_next_item_loss, sampling_log_probabilities

logger = logging.getLogger(__name__)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# What a variant's history records per epoch: no timings, so variant.json is the same on every rebuild.
HISTORY_KEYS = ("epoch", "loss", "valid_ndcg10")


def _train(model: SASRec, data: SequenceData, loss: LossFn, cfg: CompressConfig, seed: int, device: torch.device, *,
           epochs: int, lr: float, desc: str, after_step: Callable[[SASRec], None] | None = None) -> list[dict]:
    """Fine-tune or distil `model` in place with the training engine; it ends holding its best-validation weights.

    The engine options are what the compression loop has always used (see EngineSettings for why
    each exists): one process, fp32, the token mean of each batch, AdamW with its default decay over
    the trainable parameters, a fresh seed, the incoming weights validated as epoch -1 and kept if
    no epoch beats them, the best weights restored at the end, no checkpoint.
    """
    settings = EngineSettings(
        epochs=epochs, lr=lr, batch_size=cfg.batch_size, seed=seed, patience=cfg.patience, desc=desc,
        token_normalisation="local", weight_decay=None, fused=None, trainable_only=True, amp_dtype=None, compile=False,
        reseed=True, validate_initial=True, restore_best=True, checkpoint_path=None,
    )
    state = Engine(model, data, loss, settings, device, hooks=Hooks(after_step=after_step)).fit()
    return [{key: record[key] for key in HISTORY_KEYS if key in record} for record in state.history]


def fine_tune_loss(run_dir: Path, data: SequenceData | None) -> LossFn:
    """The loss the fine-tunes use: the teacher's own (models/<run>/train.json), full softmax by default.

    A teacher trained with sampled softmax or the chunked exact loss had a catalogue too large for
    tokens x catalogue logits, so its variants are fine-tuned the same way and cost what its
    training cost per step; a teacher without train.json (a hand-made model dir) gets the full softmax.
    """
    path = run_dir / "train.json"
    recorded = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    train = recorded.get("train", {})
    loss = recorded.get("loss_resolved") or train.get("loss", "full_softmax")  # `auto` resolved by the train stage
    if loss == "full_softmax" or data is None:
        return next_item_loss
    logq = sampling_log_probabilities(data.train_item_counts()) if loss == "sampled_softmax" else None
    logger.info("fine-tunes use the teacher's loss: %s", loss)
    defaults = TrainConfig()  # a train.json from before a key existed: the schema's default, the one copy of it
    return plain_next_item_loss(loss, int(train.get("n_negatives", defaults.n_negatives)), logq,
                                int(train.get("loss_block_logits", defaults.loss_block_logits)))


# The encoder.onnx format a variant's fingerprint names (runtime onnx/auto): 2 = the graph only, its weights
# supplied from model.safetensors. A variant built with an older encoder (1: the weights inside the file) is
# rebuilt; its trained model is reused (`_reused` compares the model's part of the fingerprint only).
ENCODER_FORMAT = 2
# Fingerprint keys that decide the encoder and the runtime choice, not the model's weights.
RUNTIME_KEYS = ("runtime", "encoder_format", "encoder_max_batch")

# Variants built from the model of another variant, and the variant whose model they reuse when it is current.
PQ_VARIANTS = ("pq", "pq+int8")
REUSED_FROM = {"distilled+int8": "distilled", "pq+int8": "pq"}
# The settings section each trained variant reads (the others read none): with the teacher, the seed and
# the export runtime it is what decides the variant's files, so it is the variant's fingerprint.
TRAINED_WITH = {"pruned": "pruning", "distilled": "distill", "distilled+int8": "distill", "lowrank": "lowrank",
                "pq": "pq", "pq+int8": "pq"}
VARIANT_NAMES = ("fp32", "fp16", "bf16", "int8", "int4", *TRAINED_WITH)


def input_hashes(layout: Layout, run_name: str) -> dict[str, str]:
    """The teacher's weights and the features, hashed once per stage: what every fingerprint starts from."""
    return {"teacher_sha256": _file_sha256(layout.model_dir(run_name) / WEIGHTS_FILE),
            "features_sha256": directory_sha256(layout.features_dir)}


def variant_fingerprint(cfg: CompressConfig, name: str, hashes: dict[str, str], seed: int) -> dict:
    """What variant `name`'s files depend on; a variant and the one it reuses (REUSED_FROM) share it."""
    settings = cfg.model_dump(mode="json")
    fingerprint = {"teacher_sha256": hashes["teacher_sha256"], "seed": seed, "runtime": settings["runtime"]}
    if cfg.runtime != "torch":
        fingerprint["encoder_format"] = ENCODER_FORMAT
    if cfg.runtime == "auto":
        fingerprint["encoder_max_batch"] = cfg.encoder_max_batch
    section = TRAINED_WITH.get(name)
    if section is not None:  # trained on the features with the fine-tune loop's settings
        fingerprint.update({section: settings[section], "batch_size": settings["batch_size"],
                            "patience": settings["patience"], "features_sha256": hashes["features_sha256"]})
    return fingerprint


def _current(directory: Path, fingerprint: dict, model_only: bool = False) -> dict | None:
    """The variant.json of variant directory `directory` if it was built with `fingerprint` (`model_only`:
    with its model's part, whatever encoder and runtime choice it was built with)."""
    path = directory / VARIANT_FILE
    recorded = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    if model_only:
        def strip(f: dict) -> dict:
            return {k: v for k, v in f.items() if k not in RUNTIME_KEYS}
        return recorded if "fingerprint" in recorded and strip(recorded["fingerprint"]) == strip(fingerprint) else None
    return recorded if recorded.get("fingerprint") == fingerprint else None


def _reused(cached: Path, fingerprint: dict) -> tuple[SASRec, dict] | None:
    """The model of variant directory `cached` if it was built from the same teacher and settings (its
    encoder and runtime choice aside: the model's weights do not depend on them)."""
    recorded = _current(cached, fingerprint, model_only=True)
    if recorded is None:
        return None
    logger.info("%s model reused from %s", cached.name, cached)
    info = {key: recorded[key] for key in ("history", "assignment") if key in recorded}
    # The model alone: its encoder.onnx may be of an older format, and the rebuild exports a new one.
    return load_variant(cached, with_encoder=False), {**info, "reused": str(cached)}


def _own_reuse_unrecorded(info: dict, target: Path) -> None:
    """A rebuild that reused the variant's own current model records what a first build records: the
    variant's files (DVC-cached) are the same bytes however often its stage reran."""
    if info.get("reused") == str(target):
        del info["reused"]


def pq_codebook_size(requested: int, n_rows: int) -> int:
    """The codebook size used: the requested one, capped at the table's rows (n_items + 1).

    A codebook holds the reserved padding code plus K - 1 k-means centroids of the real rows, so
    K <= n_rows is the most a catalogue supports; at that cap each centroid is one item.
    """
    return min(requested, n_rows)


def pq_subspaces(requested: int, d_model: int) -> int:
    """The sub-spaces used: the requested number, capped at d_model (one dimension each); it must divide d_model."""
    n_subspaces = min(requested, d_model)
    if d_model % n_subspaces:
        raise CompressError(f"compress.pq.n_subspaces={requested} must divide the teacher's d_model={d_model}")
    return n_subspaces


def _coded_model(teacher: SASRec, data: SequenceData | None, loss: LossFn, cfg: CompressConfig, seed: int,
                 device: torch.device, out_dir: Path, fingerprint: dict) -> tuple[SASRec, dict]:
    """Codes assigned from the teacher's table, then fine-tuned; reused from variants/pq when current."""
    reused = _reused(out_dir / "pq", fingerprint)
    if reused is not None:
        return reused
    q = cfg.pq
    n_subspaces = pq_subspaces(q.n_subspaces, teacher.cfg.d_model)
    table = teacher.item_embedding.weight.detach().cpu()
    started = time.perf_counter()
    model = code_teacher(teacher, n_subspaces, pq_codebook_size(q.codebook_size, table.shape[0]), seed)
    with torch.no_grad():
        error = (model.item_weights()[1:] - table[1:]).square().sum() / table[1:].square().sum()
    # The time is logged, not recorded: variant.json is in a DVC-cached output, whose bytes must depend
    # on the inputs only (a timing would change its hash on every rebuild).
    logger.info("pq: codes assigned in %.1fs", time.perf_counter() - started)
    info: dict = {"assignment": {"relative_squared_error": round(float(error), 6)}}
    if q.finetune_epochs:
        info["history"] = _train(model, data, loss, cfg, seed, device, epochs=q.finetune_epochs, lr=q.lr,
                                 desc="pq-finetune")
    return model.cpu().eval(), info


def _distilled_student(teacher: SASRec, data: SequenceData, cfg: CompressConfig, seed: int, device: torch.device,
                       out_dir: Path, fingerprint: dict) -> tuple[SASRec, dict]:
    """The distilled student: reused from variants/distilled when built from the same teacher and settings."""
    reused = _reused(out_dir / "distilled", fingerprint)
    if reused is not None:
        return reused
    d = cfg.distill
    student = build_student(teacher, d.d_model or teacher.cfg.d_model, d.n_layers, d.n_heads or teacher.cfg.n_heads,
                            d.init_from_teacher)
    history = _train(student, data, distillation_loss(teacher.to(device), d.temperature, d.alpha, d.top_k), cfg, seed, device,
                     epochs=d.epochs, lr=d.lr, desc="distill")
    return student.cpu().eval(), {"history": history}


def _export_encoder(directory: Path) -> None:
    """encoder.onnx beside the saved variant, computing what its PyTorch encoder computes: the graph
    only, its weights (int8 for the int8 kinds) supplied from the variant's model.safetensors at load."""
    started = time.perf_counter()
    export_variant_encoder(directory)
    logger.info("%s: %s (%s bytes, graph only) in %.1fs", directory.name, ENCODER_FILE,
                f"{(directory / ENCODER_FILE).stat().st_size:,}", time.perf_counter() - started)


def check_teacher(run_dir: Path, train_cfg: TrainConfig | None) -> None:
    """Refuse a teacher that is not the SASRec the train stage wrote there for `train_cfg`.

    models/<run>/train.json is what the last train run there recorded (written at its end, removed at
    its start): without it the model is from a run that failed or from no run at all; with another
    train.model, the model file is not its; with other settings than `train_cfg` (keys that change the
    teacher's weights), it was trained for another configuration. Compressing it would build
    variants of a model the current configuration never produced.
    """
    rerun = "run the train stage (train.model=sasrec) for the current configuration first"
    if not (run_dir / WEIGHTS_FILE).exists():
        raise CompressError(f"no SASRec teacher in {run_dir}: {rerun}")
    info = run_dir / "train.json"
    if not info.exists():
        raise CompressError(f"{run_dir} has a model but no train.json: it was not written by a finished train run; {rerun}")
    recorded = json.loads(info.read_text(encoding="utf-8")).get("train", {})
    if recorded.get("model", "sasrec") != "sasrec":
        raise CompressError(f"the last train run in {run_dir} trained train.model={recorded['model']}, not a SASRec: "
                            f"its {WEIGHTS_FILE} is not the teacher; {rerun}")
    if train_cfg is not None:
        # A train.json from before a key existed ran with the schema's default for it.
        recorded = {**TrainConfig().model_dump(mode="json"), **recorded}
        differences = config_differences(recorded, train_cfg.model_dump(mode="json"), ignore=NOT_TEACHER_KEYS)
        if differences:
            raise CompressError(f"the teacher in {run_dir} was trained with other train settings than the current ones "
                                f"({'; '.join(differences)}): {rerun}")


def compress_variant(cfg: CompressConfig, layout: Layout, run_name: str, name: str, seed: int,
                     train_cfg: TrainConfig | None = None, hashes: dict[str, str] | None = None) -> dict:
    """Build variant `name` of the teacher in models/<run_name>/ -> models/<run_name>/variants/<name>/.

    With `train_cfg` (the stage's: params.train), the teacher must have been trained with it (`check_teacher`).
    `hashes`: `input_hashes` of the teacher and features when the caller has them (`run_compress`).
    """
    run_dir = layout.model_dir(run_name)
    check_teacher(run_dir, train_cfg)
    if name not in VARIANT_NAMES:
        raise CompressError(f"unknown variant {name!r}; known: {', '.join(VARIANT_NAMES)}")
    started = time.perf_counter()
    out_dir = variants_dir(layout, run_name)
    target = out_dir / name
    fingerprint = variant_fingerprint(cfg, name, hashes or input_hashes(layout, run_name), seed)
    kept = _current(target, fingerprint)
    if kept is not None:
        # Built from the same teacher, seed, data and settings sections: its files are what a rebuild would
        # write, so it is kept (a changed compress.distill rebuilds the students only).
        logger.info("variant %s is current (same teacher and settings): kept", name)
        return {"name": name, "kind": kept["kind"], "path": str(target), "size_bytes": size_on_disk(target),
                "seconds": 0.0, "kept": True}
    torch.manual_seed(seed)
    teacher = load_model(run_dir)
    device = select_device(cfg.device, "compress.device")
    extra: dict = {"name": name, "teacher": str(run_dir)}
    needs_data = (name in ("pruned", "distilled", "distilled+int8") or (name == "lowrank" and cfg.lowrank.finetune_epochs)
                  or (name in PQ_VARIANTS and cfg.pq.finetune_epochs))
    data = load_sequences(layout.features_dir) if needs_data else None
    loss = fine_tune_loss(run_dir, data)

    if name in ("fp32", "fp16", "bf16", "int8", "int4"):
        model, kind, rank = teacher, name, None
    elif name == "lowrank":
        table_rank = cfg.lowrank.rank
        if table_rank >= teacher.cfg.d_model:
            raise CompressError(f"compress.lowrank.rank={table_rank} must be below the teacher's d_model={teacher.cfg.d_model}")
        model, kind, rank = LowRankSASRec(teacher.cfg, table_rank), "lowrank", None  # rank comes from the model
        factors, basis = factorise(teacher.item_embedding.weight, table_rank)
        state = {k: v for k, v in teacher.state_dict().items() if k != "item_embedding.weight"}
        model.load_state_dict({**state, "item_factors": factors, "basis": basis})
        if cfg.lowrank.finetune_epochs:
            extra["history"] = _train(model, data, loss, cfg, seed, device, epochs=cfg.lowrank.finetune_epochs,
                                      lr=cfg.lowrank.lr, desc="lowrank")
        model = model.cpu()
    elif name == "pruned":
        p = cfg.pruning
        model = prune_structured(teacher, p.structured_sparsity)
        masks = magnitude_masks(model, p.unstructured_sparsity)
        apply_masks(model, masks)
        if p.finetune_epochs:
            device_masks = {k: m.to(device) for k, m in masks.items()}
            # Pruned weights must stay zero: the masks are re-applied after every optimizer step.
            extra["history"] = _train(model, data, loss, cfg, seed, device, epochs=p.finetune_epochs, lr=p.lr,
                                      desc="prune-finetune", after_step=lambda m: apply_masks(m, device_masks))
        model = model.cpu()
        extra.update(structured_sparsity=p.structured_sparsity, unstructured_sparsity=p.unstructured_sparsity,
                     measured_sparsity=round(sparsity_of(model), 4))
        kind, rank = "pruned", None
    elif name in ("distilled", "distilled+int8"):
        model, info = _distilled_student(teacher, data, cfg, seed, device, out_dir, fingerprint)
        _own_reuse_unrecorded(info, out_dir / name)
        extra.update(info, student=cfg.distill.model_dump(mode="json"))
        kind, rank = ("fp32" if name == "distilled" else "int8"), None
    elif name in PQ_VARIANTS:
        model, info = _coded_model(teacher, data, loss, cfg, seed, device, out_dir, fingerprint)
        _own_reuse_unrecorded(info, out_dir / name)
        extra.update(info, pq=cfg.pq.model_dump(mode="json"))
        kind, rank = ("pq" if name == "pq" else "pq_int8"), None
    extra["fingerprint"] = fingerprint
    if cfg.runtime == "auto":
        extra[ENCODER_MAX_BATCH_KEY] = cfg.encoder_max_batch  # read by load_variant

    # Build into a temporary sibling, then swap: a failed build never leaves half a variant behind.
    staging = out_dir / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    save_variant(model, staging, kind, rank, extra=extra)
    if cfg.runtime != "torch":
        _export_encoder(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    result = {"name": name, "kind": kind, "path": str(target), "size_bytes": size_on_disk(target),
              "seconds": round(time.perf_counter() - started, 2)}
    logger.info("variant %s: %s bytes in %.1fs", name, f"{result['size_bytes']:,}", result["seconds"])
    return result


def run_compress(cfg: CompressConfig, layout: Layout, run_name: str, seed: int, train_cfg: TrainConfig | None = None) -> dict:
    """Every variant in `cfg.variants`; distilled before distilled+int8 (pq before pq+int8) so the model is trained once."""
    check_teacher(layout.model_dir(run_name), train_cfg)  # before any variant directory is touched
    order = sorted(cfg.variants, key=lambda n: n in REUSED_FROM)
    out_dir = variants_dir(layout, run_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    hashes = input_hashes(layout, run_name)  # once for every variant, not once per variant
    results = {name: compress_variant(cfg, layout, run_name, name, seed, train_cfg, hashes) for name in order}
    for stale in out_dir.iterdir():  # variants no longer listed in params would be reported as current
        if stale.is_dir() and stale.name not in results:
            shutil.rmtree(stale)
    return results
