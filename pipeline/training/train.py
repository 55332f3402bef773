"""Stage `train`: features -> models/<run>/ (SASRec teacher and the baselines).

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

A checkpoint is written atomically after every epoch; `resume=True` continues
from it and ends where an uninterrupted run would (batch order depends only on
seed and epoch, RNG state is restored). Early stopping on validation NDCG@10
keeps the best weights in models/<run>/model.safetensors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from pipeline.core.config import TrackingConfig, TrainConfig
from pipeline.core.devices import select_device
from pipeline.core.errors import TrainError
from pipeline.core.io import Layout, atomic_path, write_json
from pipeline.core.tracking import flatten, lineage_tags, mlflow_run, read_run_id, write_run_id
from pipeline.data.sequences import SequenceData, load_sequences, n_training_batches, training_batches
from pipeline.evaluation.metrics import evaluate
from pipeline.models import baselines
from pipeline.models.sasrec import PRESETS, SASRec, SASRecConfig, count_parameters, save_model

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoints/last.pt"
HISTORY_FILE = "history.json"
BASELINES_DIR = "baselines"
VALID_METRIC = "full/NDCG@10"




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


# ----------------------------------------------------------------------------- devices


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """None means full fp32. Mixed precision is a CUDA feature here; on CPU it stays fp32."""
    if device.type != "cuda" or cfg.precision == "fp32":
        return None
    if cfg.precision == "fp16":
        return torch.float16
    if cfg.precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise TrainError("train.precision=bf16 but this GPU does not support bfloat16; use fp16 or auto")
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ----------------------------------------------------------------------------- loss


class NextItemLoss(nn.Module):
    """Wraps the model so DDP sees one forward: (inputs, targets) -> summed loss and token count."""

    def __init__(self, model: SASRec, loss: str, n_negatives: int, sampling_logq: torch.Tensor | None):
        super().__init__()
        self.model = model
        self.loss = loss
        self.n_negatives = n_negatives
        self.register_buffer("sampling_logq", sampling_logq if sampling_logq is not None else torch.zeros(0), persistent=False)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.model(inputs)
        mask = targets != 0
        hidden, positives = hidden[mask], targets[mask]  # real positions only: padding costs no FLOPs
        weights = self.model.item_weights()
        if self.loss == "full_softmax":
            logits = hidden @ weights.T
            logits[:, 0] = float("-inf")  # padding is never the next item
            return F.cross_entropy(logits.float(), positives, reduction="sum")
        # Sampled softmax, negatives shared by the batch, drawn by popularity; log-Q correction
        # subtracts each sampled item's log sampling probability so the estimate is unbiased.
        negatives = torch.multinomial(self.sampling_logq.exp(), self.n_negatives, replacement=True)
        pos_logit = (hidden * weights[positives]).sum(-1) - self.sampling_logq[positives]
        neg_logits = hidden @ weights[negatives].T - self.sampling_logq[negatives]
        neg_logits = neg_logits.masked_fill(negatives.view(1, -1) == positives.view(-1, 1), float("-inf"))
        logits = torch.cat([pos_logit.unsqueeze(1), neg_logits], dim=1).float()
        return F.cross_entropy(logits, torch.zeros(len(positives), dtype=torch.long, device=logits.device), reduction="sum")


def flops_per_token(cfg: SASRecConfig, seq_len: int, loss: str, n_negatives: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward) for the TFLOP/s figure."""
    d, layers = cfg.d_model, cfg.n_layers
    block = 2 * (3 * d * d + d * d + 2 * cfg.ffn_multiplier * d * d) + 2 * 2 * seq_len * d / 2  # matmuls + causal attention
    output = 2 * d * ((cfg.n_items + 1) if loss == "full_softmax" else n_negatives + 1)
    return 3.0 * (layers * block + output)


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size())


def _all_reduce_sum(value: float, device: torch.device, world: Dist) -> float:
    if world.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def _broadcast_flag(flag: bool, device: torch.device, world: Dist) -> bool:
    if world.world_size == 1:
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


# ----------------------------------------------------------------------------- checkpoints


def _save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which, do not guess
        raise TrainError(f"cannot load checkpoint {path}: {err}") from err


# ----------------------------------------------------------------------------- the stage


def build_model_config(cfg: TrainConfig, n_items: int) -> SASRecConfig:
    shape = dict(PRESETS[cfg.preset])
    for key in ("d_model", "n_layers", "n_heads", "max_len"):
        if getattr(cfg, key) is not None:
            shape[key] = getattr(cfg, key)
    if shape["d_model"] % shape["n_heads"]:
        raise TrainError(f"d_model={shape['d_model']} is not divisible by n_heads={shape['n_heads']}")
    return SASRecConfig(n_items=n_items, dropout=cfg.dropout, **shape)


def curriculum_len(cfg: TrainConfig, max_len: int, epoch: int) -> int:
    """Maximum training sequence length at `epoch` (0-based): grows linearly to max_len."""
    if not cfg.curriculum.enabled or epoch >= cfg.curriculum.epochs:
        return max_len
    start = min(cfg.curriculum.start_len, max_len)
    return int(round(start + (max_len - start) * epoch / cfg.curriculum.epochs))


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train_baselines(cfg: TrainConfig, data: SequenceData, run_dir: Path, seed: int, device: torch.device) -> dict[str, float]:
    """Popularity counts and BPR-MF, saved as safetensors beside the main model."""
    out_dir = run_dir / BASELINES_DIR
    shutil.rmtree(out_dir, ignore_errors=True)  # no stale baseline from an earlier config survives
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds = {}
    names = set(cfg.baselines) | ({cfg.model} - {"sasrec"})
    if "popularity" in names:
        started = time.perf_counter()
        with atomic_path(out_dir / "popularity.safetensors") as tmp:
            save_file({"counts": torch.from_numpy(data.train_item_counts())}, str(tmp))
        seconds["popularity"] = time.perf_counter() - started
    if "bpr" in names:
        started = time.perf_counter()
        model = baselines.train_bpr(data, cfg.bpr, seed, device)
        with atomic_path(out_dir / "bpr.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
        seconds["bpr"] = time.perf_counter() - started
    return seconds


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
    model = model.to(device)
    counts = torch.from_numpy(data.train_item_counts()).double() + 1.0
    counts[0] = 0.0
    logq = (counts / counts.sum()).log().float().to(device) if cfg.loss == "sampled_softmax" else None
    loss_module: nn.Module = NextItemLoss(model, cfg.loss, cfg.n_negatives, logq)
    if world.world_size > 1:
        loss_module = nn.parallel.DistributedDataParallel(loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    # dynamic=True: bucketed batches vary in length, and one graph per length would recompile all epoch.
    step_module = torch.compile(loss_module, dynamic=True) if cfg.compile else loss_module

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98), fused=device.type == "cuda",
    )
    amp_dtype = autocast_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    checkpoint_path = run_dir / CHECKPOINT_FILE
    state = {"epoch": -1, "best_metric": -1.0, "best_epoch": -1, "bad_epochs": 0, "stopped_early": False, "history": []}
    if resume and checkpoint_path.exists():
        checkpoint = _load_checkpoint(checkpoint_path)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["torch_rng"])
        state = {k: checkpoint[k] for k in state if k != "history"} | {"history": json.loads(checkpoint["history_json"])}
        logger.info("resuming %s after epoch %d (best %s=%.4f)", run_dir, state["epoch"], VALID_METRIC, state["best_metric"])
    elif resume:
        logger.info("no checkpoint at %s: starting from scratch", checkpoint_path)
    else:
        # A fresh run must not leave an older run's checkpoint behind: a later --resume would load it.
        checkpoint_path.unlink(missing_ok=True)

    n_params = count_parameters(model)
    tags = lineage_tags(layout.root, layout.features_dir) if world.is_main and tracking.enabled else {}
    previous_run_id = read_run_id(run_dir) if resume else None
    if not resume:
        write_run_id(run_dir, None)  # an untracked fresh run has no MLflow run (and DVC expects the file)
    mlflow_run_id = None
    tracking_ctx = mlflow_run(tracking, layout.root, f"train-{cfg.run_name}", run_id=previous_run_id, tags=tags) if world.is_main else contextlib.nullcontext()

    with tracking_ctx as mlflow_active:
        mlflow = None
        if mlflow_active is not None:
            import mlflow

            if previous_run_id is None:
                mlflow.log_params(flatten({"train": cfg.model_dump(mode="json"), "model": model_cfg.to_dict(), "seed": seed}))
                mlflow.log_params({"data.users": len(data.users), "data.items": data.n_items, "model.parameters": n_params,
                                   "device": str(device), "precision": str(amp_dtype or "fp32"), "world_size": world.world_size})
                mlflow.log_dict({"train": cfg.model_dump(mode="json"), "model": model_cfg.to_dict(), "seed": seed}, "config.json")
            mlflow_run_id = mlflow_active.info.run_id
            write_run_id(run_dir, mlflow_run_id)
        logger.info("train: %s preset=%s, %s parameters, device=%s, precision=%s, world=%d",
                    cfg.model, cfg.preset, f"{n_params:,}", device, amp_dtype or "fp32", world.world_size)

        epoch = state["epoch"] + 1
        while cfg.model == "sasrec" and not state["stopped_early"] and epoch < cfg.epochs:
            seq_len = curriculum_len(cfg, model_cfg.max_len, epoch)
            model.train()
            epoch_started = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            n_sequences = n_tokens = 0
            loss_total = 0.0
            batches = training_batches(data, cfg.batch_size, seq_len, seed, epoch, world.rank, world.world_size)
            bar = tqdm(batches, total=n_training_batches(data, cfg.batch_size), desc=f"epoch {epoch}", unit="batch",
                       disable=None if world.is_main else True, leave=False)
            for batch in bar:
                if device.type == "cuda":
                    batch = batch.pin_memory()
                batch = batch.to(device, non_blocking=True)
                local_tokens = int(batch.lengths.sum())
                global_tokens = _all_reduce_sum(local_tokens, device, world)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss_sum = step_module(batch.inputs, batch.targets)
                # Sum over local tokens / global tokens x world: DDP's gradient average then equals
                # the gradient of the mean over every token of the global batch.
                loss = loss_sum * world.world_size / global_tokens
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                n_sequences += len(batch.rows)
                n_tokens += local_tokens
                loss_total += float(loss_sum.detach())
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_seconds = time.perf_counter() - epoch_started
            n_sequences = int(_all_reduce_sum(n_sequences, device, world))
            n_tokens = int(_all_reduce_sum(n_tokens, device, world))
            loss_total = _all_reduce_sum(loss_total, device, world)

            stop = False
            if world.is_main:
                model.eval()
                valid = evaluate(lambda b: model.score(b.inputs, b.lengths), data, "valid", ks=(10,), batch_size=eval_batch_size,
                                 max_len=model_cfg.max_len, device=device, sampled_strategies=(), seed=seed, progress=False)
                metric = valid[VALID_METRIC]
                record = {
                    "epoch": epoch, "loss": loss_total / max(n_tokens, 1), "valid_ndcg10": metric, "valid_hr10": valid["full/HR@10"],
                    "train_seconds": train_seconds, "seq_len": seq_len, "sequences_per_s": n_sequences / train_seconds,
                    "tokens_per_s": n_tokens / train_seconds, "peak_memory_mib": _peak_memory_mib(device),
                    "elapsed_seconds": time.perf_counter() - started,
                }
                if device.type == "cuda":
                    record["tflops"] = flops_per_token(model_cfg, seq_len, cfg.loss, cfg.n_negatives) * n_tokens / train_seconds / 1e12
                state["history"].append(record)
                if metric > state["best_metric"]:
                    state.update(best_metric=metric, best_epoch=epoch, bad_epochs=0)
                    save_model(model, run_dir)
                else:
                    state["bad_epochs"] += 1
                stop = state["bad_epochs"] >= cfg.early_stopping_patience
                state["epoch"] = epoch
                state["stopped_early"] = stop
                _save_checkpoint(checkpoint_path, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "torch_rng": torch.get_rng_state(), **{k: v for k, v in state.items() if k != "history"},
                    "history_json": json.dumps(state["history"]),
                })
                logger.info("epoch %d: loss %.4f valid NDCG@10 %.4f HR@10 %.4f | %.1fs, %.0f seq/s, %.0f tok/s, peak %.0f MiB%s",
                            epoch, record["loss"], metric, record["valid_hr10"], train_seconds, record["sequences_per_s"],
                            record["tokens_per_s"], record["peak_memory_mib"],
                            f", {record['tflops']:.2f} TFLOP/s" if "tflops" in record else "")
                if mlflow is not None:
                    mlflow.log_metrics({k: float(v) for k, v in record.items() if k != "epoch"}, step=epoch)
                if stop:
                    logger.info("early stopping: no better %s for %d epochs (best %.4f at epoch %d)",
                                VALID_METRIC, cfg.early_stopping_patience, state["best_metric"], state["best_epoch"])
            if _broadcast_flag(stop, device, world):
                break
            epoch += 1

        if world.is_main:
            baseline_seconds = train_baselines(cfg, data, run_dir, seed, device)
            write_json(state["history"], run_dir / HISTORY_FILE)
            write_json({"train": cfg.model_dump(mode="json"), "seed": seed, "parameters": n_params,
                        "best_epoch": state["best_epoch"], "best_valid_ndcg10": state["best_metric"],
                        "baseline_seconds": baseline_seconds}, run_dir / "train.json")
            if mlflow is not None:
                mlflow.log_metrics({"best_valid_ndcg10": max(state["best_metric"], 0.0), "best_epoch": state["best_epoch"]})
                if (run_dir / "model.safetensors").exists():
                    mlflow.log_artifacts(str(run_dir), artifact_path="model")
    if world.world_size > 1:
        dist.barrier()
    return TrainResult(
        run_dir=str(run_dir), best_epoch=state["best_epoch"], best_valid_ndcg10=state["best_metric"], epochs_run=len(state["history"]),
        seconds=round(time.perf_counter() - started, 3), parameters=n_params,
        mlflow_run_id=mlflow_run_id,
        history=state["history"],
    )


