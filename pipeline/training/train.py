"""Stage `train`: features -> models/<run>/ (SASRec teacher and the baselines).

A thin stage over the training engine (pipeline/training/engine.py): it builds the model
config, the model and the next-item loss, calls the engine, and writes the outputs
(model.safetensors on every better validation epoch, history.json, train.json, the
baselines, run.json with the MLflow run; in the MLflow run, the per-epoch metrics with step=epoch
and their picture, pipeline/training/curve.py).

GPU first, CPU fallback, one code path:
- CUDA: bf16 autocast (fp16 + GradScaler where bf16 is missing), TF32 matmuls,
  fused AdamW, optional torch.compile, pinned batches copied non-blocking;
- CPU: the same loop in fp32, deterministic for a given seed.
Batches are bucketed by sequence length (pipeline/data/sequences.py), so padding is
hardly computed; the loss only touches real positions.

Data parallel: run under `torchrun --nproc_per_node N` (NCCL on GPU, Gloo on
CPU). Every rank builds the same global batches and takes its slice, and the
loss is normalised by the global token count, so N processes compute the same
update as one process with the same batch size.

A checkpoint is written atomically after every epoch, with the configuration it belongs to
(`resume_fingerprint`: the train keys that decide the weights, the model shape, the seed, the
features' content hash), the best weights so far and the MLflow run. A run continues from it,
and ends where an uninterrupted run would (batch order depends only on seed and epoch, RNG state
is restored), when it is asked to (`resume=True`, `--resume`: a checkpoint of another configuration
or shape is refused, naming what differs) or, without being asked, when the checkpoint is of an
interrupted run of this same configuration (a killed `dvc repro` reruns the stage; the model file
DVC deleted is written again from the checkpoint's best weights). A checkpoint of another
configuration, or of a finished run, is replaced (a warning names what differed). A killed run
leaves its MLflow run RUNNING: the resumed run re-opens it, and runs of this name whose process is
gone are marked FAILED when the next one starts. Early stopping on validation NDCG@10 keeps the
best weights in models/<run>/model.safetensors.

models/<run>/ describes only this run: what an earlier run left that this one does not write (a
SASRec model when train.model=popularity, its train.json and history, the variants compressed
from it) is removed when the run starts.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from pipeline.core.config import TrackingConfig, TrainConfig
from pipeline.core.devices import select_device
from pipeline.core.errors import TrainError
from pipeline.core.io import Layout, write_json
from pipeline.core.tracking import (
    directory_sha256,
    fail_orphaned_runs,
    flatten,
    lineage_tags,
    log_split_input,
    mlflow_run,
    read_run_id,
    resumable_run_id,
    write_run_id,
)
from pipeline.data.features import SEQUENCES_FILE
from pipeline.data.sequences import SequenceData, load_sequences
from pipeline.models.sasrec import CONFIG_FILE, PRESETS, WEIGHTS_FILE, SASRec, SASRecConfig, count_parameters, save_model
from pipeline.training.baselines import train_baselines
from pipeline.training.checkpoint import (
    RESUMABLE_CHANGES,
    checkpoint_history,
    checkpoint_meta,
    config_differences,
    load_checkpoint,
    shape_differences,
)
from pipeline.training.curve import log_training_curve
from pipeline.training.distributed import barrier, init_distributed
from pipeline.training.engine import Engine, EngineSettings, Hooks
from pipeline.training.losses import NextItemLoss, module_loss, resolve_loss, sampling_log_probabilities
from pipeline.training.sharded import shard_teacher

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoints/last.pt"
HISTORY_FILE = "history.json"
TRAIN_INFO_FILE = "train.json"
VARIANTS_DIR = "variants"  # the compress stage's, built from the teacher this run replaces


@dataclass
class TrainResult:
    run_dir: str
    best_epoch: int
    best_valid_ndcg10: float
    epochs_run: int
    seconds: float
    parameters: int
    mlflow_run_id: str | None
    history: list[dict] = field(default_factory=list)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """None means full fp32. Mixed precision is a CUDA feature here; on CPU it stays fp32."""
    if device.type != "cuda" or cfg.precision == "fp32":
        return None
    if cfg.precision == "fp16":
        return torch.float16
    if cfg.precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise TrainError("train.precision=bf16 but this GPU does not support bfloat16; use fp16 or auto")
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def flops_per_token(cfg: SASRecConfig, seq_len: int, loss: str, n_negatives: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward) for the TFLOP/s figure.

    Model FLOPs: chunked_softmax does the full softmax's matmuls (it computes no logits twice).
    """
    d, layers = cfg.d_model, cfg.n_layers
    block = 2 * (3 * d * d + d * d + 2 * cfg.ffn_multiplier * d * d) + 2 * 2 * seq_len * d / 2  # matmuls + causal attention
    output = 2 * d * (n_negatives + 1 if loss == "sampled_softmax" else cfg.n_items + 1)
    return 3.0 * (layers * block + output)


def build_model_config(cfg: TrainConfig, n_items: int) -> SASRecConfig:
    shape = dict(PRESETS[cfg.preset])
    for key in ("d_model", "n_layers", "n_heads", "max_len"):
        if getattr(cfg, key) is not None:
            shape[key] = getattr(cfg, key)
    if shape["d_model"] % shape["n_heads"]:
        raise TrainError(f"d_model={shape['d_model']} is not divisible by n_heads={shape['n_heads']}")
    return SASRecConfig(n_items=n_items, dropout=cfg.dropout, **shape)


def teacher_loss(cfg: TrainConfig, model: SASRec, data: SequenceData, device: torch.device) -> NextItemLoss:
    """The teacher's next-item loss for `cfg` (`auto` resolved on the catalogue size; `.loss` says which).

    With train.sparse_item_updates the model's input lookup turns sparse too, so that the tied table's
    gradient holds the touched rows only and the engine updates it with SparseAdam.
    """
    loss = resolve_loss(cfg.loss, data.n_items, cfg.chunked_softmax_above_items, cfg.sampled_softmax_above_items)
    if cfg.sparse_item_updates:
        model.item_embedding.sparse = True
    logq = sampling_log_probabilities(data.train_item_counts()).to(device) if loss == "sampled_softmax" else None
    return NextItemLoss(model, loss, cfg.n_negatives, logq, cfg.loss_block_logits, cfg.sparse_item_updates)


def curriculum_len(cfg: TrainConfig, max_len: int, epoch: int) -> int:
    """Maximum training sequence length at `epoch` (0-based): grows linearly to max_len."""
    if not cfg.curriculum.enabled or epoch >= cfg.curriculum.epochs:
        return max_len
    start = min(cfg.curriculum.start_len, max_len)
    return int(round(start + (max_len - start) * epoch / cfg.curriculum.epochs))


def engine_settings(cfg: TrainConfig, seed: int, device: torch.device, checkpoint_path: Path, resume: bool,
                    eval_batch_size: int) -> EngineSettings:
    """The teacher's engine options: what this stage has always done (see EngineSettings for each)."""
    return EngineSettings(
        epochs=cfg.epochs if cfg.model == "sasrec" else 0,  # a baseline-only run trains no SASRec epoch
        lr=cfg.lr, batch_size=cfg.batch_size, seed=seed, patience=cfg.early_stopping_patience,
        eval_batch_size=eval_batch_size, validation_users=cfg.validation_users, desc="epoch", token_normalisation="global",
        weight_decay=cfg.weight_decay,
        fused=True, trainable_only=False, amp_dtype=autocast_dtype(cfg, device), compile=cfg.compile,
        reseed=False, validate_initial=False, restore_best=False, checkpoint_path=checkpoint_path, resume=resume,
        checkpoint_best=True,
    )


def resume_fingerprint(cfg: TrainConfig, model_cfg: SASRecConfig, loss: str, seed: int, features_sha256: str) -> dict:
    """What a checkpoint must match to be resumed: everything that decides the weights (not epochs, device...)."""
    train = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RESUMABLE_CHANGES}
    return {"train": train, "model": model_cfg.to_dict(), "loss_resolved": loss, "seed": seed,
            "features_sha256": features_sha256}


def plan_resume(path: Path, fingerprint: dict, model: SASRec, epochs: int, asked: bool) -> dict | None:
    """The checkpoint to continue from (memory-mapped), or None for a fresh run; see the module docstring.

    `asked` (--resume): a checkpoint of another shape or configuration is an error that says what differs.
    Otherwise only an interrupted run of the same configuration is resumed; any other checkpoint is replaced.
    """
    if not path.exists():
        if asked:
            logger.info("no checkpoint at %s: starting from scratch", path)
        return None
    checkpoint = load_checkpoint(path, mmap=True)
    meta = checkpoint_meta(checkpoint)
    problems = shape_differences(checkpoint["model"], model.state_dict())
    if meta is not None:
        problems += config_differences(meta["fingerprint"], fingerprint)
    elif not asked:
        problems.append("it records no configuration (written before checkpoints did)")
    if problems:
        if asked:
            raise TrainError(f"--resume: the checkpoint {path} is not of this configuration: {'; '.join(problems)}. Train with "
                             "the configuration that wrote it, or without --resume to start afresh (the checkpoint is replaced)")
        logger.warning("checkpoint %s is of another configuration (%s): starting afresh, it is replaced", path, "; ".join(problems))
        return None
    if not asked and (checkpoint["stopped_early"] or checkpoint["epoch"] + 1 >= epochs):
        logger.info("checkpoint %s is of a finished run: starting afresh", path)
        return None
    if not asked:
        logger.info("resuming the interrupted run of this configuration from %s (epoch %d done)", path, checkpoint["epoch"])
    return checkpoint


def clear_stale_outputs(run_dir: Path, resuming: bool, checkpoint: dict | None, model_cfg: SASRecConfig) -> None:
    """Remove what an earlier run left in `run_dir` that this run does not write; a resumed run keeps its best model.

    A resumed run whose model file is gone (`dvc repro` deletes a stage's outputs before it reruns) writes
    it again from the checkpoint's best weights, so it exists even if no later epoch improves on them.
    """
    stale = [TRAIN_INFO_FILE, HISTORY_FILE, VARIANTS_DIR] + ([] if resuming else [WEIGHTS_FILE, CONFIG_FILE])
    for name in stale:
        target = run_dir / name
        if target.exists():
            logger.info("removing %s, left by an earlier run", target)
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    if checkpoint is not None and not (run_dir / WEIGHTS_FILE).exists():
        if "best_model" not in checkpoint:
            logger.warning("%s is missing and the checkpoint holds no best weights: it is written at the next better epoch",
                           run_dir / WEIGHTS_FILE)
            return
        best = SASRec(model_cfg)
        best.load_state_dict(checkpoint["best_model"])
        save_model(best, run_dir)
        logger.info("%s written again from the checkpoint's best weights (epoch %d)", run_dir / WEIGHTS_FILE,
                    checkpoint["best_epoch"])


def run_train(
    cfg: TrainConfig,
    tracking: TrackingConfig,
    layout: Layout,
    seed: int,
    resume: bool = False,
    eval_batch_size: int = 512,
) -> TrainResult:
    started = time.perf_counter()
    if not (layout.features_dir / "sequences.parquet").exists():
        raise TrainError(f"{layout.features_dir}/sequences.parquet not found: run the features stage first")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = select_device(cfg.device, "train.device")
    world = init_distributed(device)
    data = load_sequences(layout.features_dir)
    run_dir = layout.model_dir(cfg.run_name)
    run_dir.mkdir(parents=True, exist_ok=True)
    # The one seed of the run: model initialisation, dropout and negative sampling draw from here in
    # this order, and a resumed run restores the RNG state from its checkpoint instead.
    torch.manual_seed(seed)

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    model_cfg = build_model_config(cfg, data.n_items)
    model = SASRec(model_cfg)
    if cfg.init_from:
        if cfg.model != "sasrec":
            raise TrainError(f"train.init_from warm-starts SASRec only; train.model is {cfg.model}")
        from pipeline.training.warmstart import warm_start

        warm_start(model, cfg.init_from)  # a checkpoint loaded by --resume below still wins
    sharded = cfg.embedding_engine == "torchrec" and cfg.model == "sasrec"
    if not sharded:  # the sharded path copies each rank's rows to the device, never the whole table
        model = model.to(device)
    loss_module = teacher_loss(cfg, model, data, device)
    loss = loss_module.loss

    n_params = count_parameters(model)
    tags = lineage_tags(layout.root, layout.features_dir) if world.is_main and tracking.enabled else {}
    checkpoint_path = run_dir / CHECKPOINT_FILE
    fingerprint = resume_fingerprint(cfg, model_cfg, loss, seed,
                                     tags.get("leanrec.features.sha256") or directory_sha256(layout.features_dir))
    # The sharded teacher keeps no engine checkpoint (pipeline/training/sharded.py): --resume is its own.
    checkpoint = None if sharded else plan_resume(checkpoint_path, fingerprint, model, cfg.epochs if cfg.model == "sasrec" else 0,
                                                   asked=resume)
    resuming = resume if sharded else checkpoint is not None
    barrier(world)  # every rank has read the checkpoint before rank 0 changes the run dir
    if world.is_main:
        clear_stale_outputs(run_dir, resuming, checkpoint, model_cfg)
    meta = (checkpoint_meta(checkpoint) or {}) if checkpoint is not None else {}
    settings = engine_settings(cfg, seed, device, checkpoint_path, resuming, eval_batch_size)
    amp_dtype = settings.amp_dtype
    resumed_history = checkpoint_history(checkpoint) if checkpoint is not None else []
    del checkpoint  # the engine loads it again (mapped, so cheaply)

    previous_run_id = (meta.get("mlflow_run_id") or read_run_id(run_dir)) if resuming else None
    if world.is_main and tracking.enabled:
        previous_run_id = resumable_run_id(tracking, layout.root, previous_run_id)
        fail_orphaned_runs(tracking, layout.root, f"train-{cfg.run_name}", keep=previous_run_id)
    if not resuming:
        write_run_id(run_dir, None)  # an untracked fresh run has no MLflow run (and DVC expects the file)
    mlflow_run_id = None
    tracking_ctx = (mlflow_run(tracking, layout.root, f"train-{cfg.run_name}", run_id=previous_run_id, tags=tags)
                    if world.is_main else contextlib.nullcontext())

    with tracking_ctx as mlflow_active:
        mlflow = None
        if mlflow_active is not None:
            import mlflow

            if previous_run_id is None:
                mlflow.log_params(flatten({"train": cfg.model_dump(mode="json"), "model": model_cfg.to_dict(), "seed": seed}))
                mlflow.log_params({"data.users": len(data.users), "data.items": data.n_items, "model.parameters": n_params,
                                   "train.loss_resolved": loss,
                                   "device": str(device), "precision": str(amp_dtype or "fp32"), "world_size": world.world_size})
                mlflow.log_dict({"train": cfg.model_dump(mode="json"), "model": model_cfg.to_dict(), "seed": seed}, "config.json")
                # The sequences' training prefixes fit the model; their validation items stop it early.
                for split in ("train", "valid"):
                    log_split_input(layout.features_dir / SEQUENCES_FILE, split)
            mlflow_run_id = mlflow_active.info.run_id
            write_run_id(run_dir, mlflow_run_id)
        # Every checkpoint says which configuration (and MLflow run) it belongs to.
        settings = replace(settings, checkpoint_meta={"fingerprint": fingerprint, "mlflow_run_id": mlflow_run_id})
        logger.info("train: %s preset=%s, %s parameters, device=%s, precision=%s, world=%d",
                    cfg.model, cfg.preset, f"{n_params:,}", device, amp_dtype or "fp32", world.world_size)
        sampled_above = "never" if cfg.sampled_softmax_above_items is None else f"above {cfg.sampled_softmax_above_items:,} items"
        logger.info("train: loss %s%s on %s items%s", loss,
                    f" (train.loss=auto, chunked above {cfg.chunked_softmax_above_items:,} items, sampled {sampled_above})"
                    if cfg.loss == "auto" else "",
                    f"{data.n_items:,}", ", sparse item-table updates (SparseAdam)" if cfg.sparse_item_updates else "")

        def log_epoch(record: dict) -> None:
            mlflow.log_metrics({k: float(v) for k, v in record.items() if k != "epoch"}, step=record["epoch"])

        if mlflow is not None and previous_run_id is not None and resumed_history:
            # The engine writes an epoch's checkpoint before its MLflow call: a run killed between the two
            # left that epoch's metrics unlogged. Log what the checkpoint has and the re-opened run lacks.
            logged = {m.step for m in mlflow.MlflowClient().get_metric_history(previous_run_id, "valid_ndcg10")}
            for record in resumed_history:
                if record["epoch"] not in logged:
                    log_epoch(record)

        if sharded:  # train.embedding_engine=torchrec: the item table row-wise over the ranks (pipeline/training/sharded.py)
            # The sharded teacher computes its own loss (it looks its rows up itself): no NextItemLoss.
            engine_model, step_module = shard_teacher(cfg, model, loss_module.sampling_logq, world, device, resume=resume,
                                                      amp_dtype=amp_dtype)
            engine_loss_module, engine_settings_ = None, replace(settings, checkpoint_path=None)
            export, before_validate = (lambda m: m.to_sasrec()), (lambda m: m.gather_table())
        else:
            engine_model, step_module, engine_settings_, engine_loss_module = model, None, settings, loss_module
            export, before_validate = (lambda m: m), None
        engine = Engine(
            engine_model, data, module_loss, engine_settings_, device, world=world, loss_module=engine_loss_module,
            step_module=step_module,
            hooks=Hooks(on_improve=lambda m, record: save_model(export(m), run_dir), on_epoch_end=log_epoch if mlflow is not None else None,
                        before_validate=before_validate),
            seq_len=lambda epoch: curriculum_len(cfg, model_cfg.max_len, epoch),
            flops_per_token=lambda seq_len: flops_per_token(model_cfg, seq_len, loss, cfg.n_negatives),
            started=started,
        )
        state = engine.fit()

        if world.is_main:
            baseline_seconds = train_baselines(cfg, data, run_dir, seed, device)
            write_json(state.history, run_dir / HISTORY_FILE)
            write_json({"train": cfg.model_dump(mode="json"), "loss_resolved": loss, "seed": seed, "parameters": n_params,
                        "best_epoch": state.best_epoch, "best_valid_ndcg10": state.best_metric,
                        "baseline_seconds": baseline_seconds}, run_dir / TRAIN_INFO_FILE)
            if mlflow is not None:
                mlflow.log_metrics({"best_valid_ndcg10": max(state.best_metric, 0.0), "best_epoch": state.best_epoch})
                if state.history:  # the per-epoch metrics are logged with step=epoch; this is them as one picture
                    log_training_curve(state.history, f"SASRec teacher, run {cfg.run_name}: training curve")
                if (run_dir / WEIGHTS_FILE).exists():
                    mlflow.log_artifacts(str(run_dir), artifact_path="model")
    barrier(world)
    return TrainResult(
        run_dir=str(run_dir), best_epoch=state.best_epoch, best_valid_ndcg10=state.best_metric, epochs_run=len(state.history),
        seconds=round(time.perf_counter() - started, 3), parameters=n_params,
        mlflow_run_id=mlflow_run_id,
        history=state.history,
    )
