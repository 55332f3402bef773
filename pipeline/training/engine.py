"""The training engine: one epoch/batch loop for every SASRec-shaped model the pipeline trains.

Callers (the teacher stage in pipeline/training/train.py; fine-tuning after pruning or
low-rank factorisation and distillation in pipeline/compression/compress.py) build a
model, a loss and `EngineSettings`, then call `Engine(...).fit()`. The engine owns:

- the loop: bucketed next-item batches (order depends on seed and epoch only), a
  pluggable loss (model, batch) -> (summed loss, token count), AdamW (and SparseAdam for
  the rows of sparse embedding tables, see `build_optimizer`), autocast + GradScaler when
  asked, DDP under torchrun and optional torch.compile;
- validation on the valid split (full-ranking NDCG@10) after every epoch, early stopping
  after `patience` epochs without a better value, and the best weights: handed to the
  `on_improve` hook and/or kept in memory and restored at the end;
- a checkpoint after every epoch and `resume`, which ends where an uninterrupted run ends
  (batch order depends on seed and epoch only, the RNG state is saved);
- a progress bar, a log line and a record per epoch (`TrainState.history`), handed to the
  `on_epoch_end` hook (the teacher logs it to MLflow).

Where the two former loops differed, `EngineSettings` has an option, and each caller
passes what it did before, so the same seed gives the same weights bit for bit.
"""

from __future__ import annotations

import copy
import json
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from tqdm import tqdm

from pipeline.data.sequences import Batch, SequenceData, n_training_batches, training_batches
from pipeline.evaluation.metrics import evaluate, validation_sample
from pipeline.training.checkpoint import checkpoint_history, load_checkpoint, save_checkpoint
from pipeline.training.distributed import SINGLE_PROCESS, Dist, all_reduce_sum, broadcast_flag
from pipeline.training.losses import LossFn

logger = logging.getLogger(__name__)

VALID_METRIC = "full/NDCG@10"
BETAS = (0.9, 0.98)


@dataclass(frozen=True)
class EngineSettings:
    epochs: int
    lr: float
    batch_size: int
    seed: int
    patience: int
    eval_batch_size: int = 512
    validation_users: int | None = None  # validate on a sample of this many users, seeded by `seed` (None: all)
    desc: str = "epoch"  # progress bar and log prefix
    # "global": sum * world_size / tokens of the global batch, so that DDP's gradient average
    # is the gradient of the mean over every token (the teacher). "local": sum / max(tokens, 1)
    # over this process's batch, with a guard for a batch without targets (the compression
    # fine-tunes, always single-process). With one process and tokens > 0 they agree.
    token_normalisation: Literal["global", "local"] = "local"
    # None: AdamW's own default decay (0.01) is used, as the compression fine-tunes always did.
    weight_decay: float | None = None
    # True: fused AdamW kernels on CUDA (fused=False is passed elsewhere), the teacher's speed-up.
    # None: the argument is not passed (the compression fine-tunes), so torch picks its default.
    fused: bool | None = None
    # True: only parameters with requires_grad reach the optimizer (fine-tunes of models whose
    # caller may freeze parts). False: model.parameters(), as the teacher always passed.
    trainable_only: bool = True
    amp_dtype: torch.dtype | None = None  # autocast dtype on CUDA; fp16 also turns the GradScaler on
    compile: bool = False  # torch.compile(dynamic=True): bucketed batches vary in length
    # Re-seed torch when fit() starts: each compression fine-tune then starts from the same RNG
    # state whatever ran before it in the process. The teacher seeds before building its model.
    reseed: bool = False
    # Validate the incoming weights as epoch -1: a fine-tune keeps them if no epoch beats them.
    validate_initial: bool = False
    # Keep a copy of the best weights in memory and load it into the model at the end (the
    # fine-tunes return the model). The teacher instead saves them from `on_improve` and ends
    # holding its last weights, which its checkpoint needs for resuming.
    restore_best: bool = False
    checkpoint_path: Path | None = None  # written after every epoch (rank 0)
    resume: bool = False  # continue from checkpoint_path if it exists; otherwise a fresh run deletes it
    # Also keep a CPU copy of the best weights in the checkpoint (the teacher: a resumed run whose
    # model file was deleted, as `dvc repro` deletes a stage's outputs, writes its best weights again).
    checkpoint_best: bool = False
    # Plain values saved with every checkpoint (the teacher: the configuration it belongs to, its MLflow run).
    checkpoint_meta: dict | None = None


@dataclass
class Hooks:
    after_step: Callable[[nn.Module], None] | None = None  # after every optimizer step (pruning masks)
    on_improve: Callable[[nn.Module, dict], None] | None = None  # (model, record) on a new best validation
    on_epoch_end: Callable[[dict], None] | None = None  # the epoch's record, after its checkpoint (MLflow)
    # Every rank, after an epoch's training and before rank 0 validates (a sharded item table gathers its rows).
    before_validate: Callable[[nn.Module], None] | None = None


@dataclass
class TrainState:
    """What a checkpoint restores besides weights, optimizer and RNG; `epoch` is the last one finished."""

    epoch: int = -1
    best_metric: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)


class SparseAndDense:
    """AdamW for the dense parameters and SparseAdam for sparse embedding tables, stepped as one optimizer.

    Enough of torch.optim.Optimizer for the engine, GradScaler (param_groups, step) and checkpoints
    (state_dict / load_state_dict: one entry per optimizer).
    """

    def __init__(self, dense: torch.optim.Optimizer, sparse: torch.optim.Optimizer):
        self.optimizers = {"dense": dense, "sparse": sparse}

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers.values() for group in optimizer.param_groups]

    @property
    def state(self) -> dict:
        return {k: v for optimizer in self.optimizers.values() for k, v in optimizer.state.items()}

    def step(self, closure: Callable | None = None) -> None:
        if closure is not None:
            raise ValueError("SparseAndDense.step takes no closure")
        for optimizer in self.optimizers.values():
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError("the checkpoint's optimizer state is not a sparse-and-dense one: resume with the same "
                             "train.sparse_item_updates as the run that wrote it")
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state[name])


def build_optimizer(model: nn.Module, settings: EngineSettings, device: torch.device) -> torch.optim.Optimizer | SparseAndDense:
    """AdamW over the parameters; the weights of `nn.Embedding(sparse=True)` tables go to SparseAdam instead.

    A sparse table's gradient holds only the rows the step touched (sampled softmax: inputs, positives and
    sampled negatives), and SparseAdam updates those rows and their moments only: untouched rows keep
    their moments, where AdamW would decay them and keep moving the rows. SparseAdam has no weight decay.
    """
    s = settings
    params = [p for p in model.parameters() if p.requires_grad] if s.trainable_only else list(model.parameters())
    sparse_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse}
    options: dict = {"lr": s.lr, "betas": BETAS}
    if s.weight_decay is not None:
        options["weight_decay"] = s.weight_decay
    if s.fused is not None:
        options["fused"] = s.fused and device.type == "cuda"
    sparse = [p for p in params if id(p) in sparse_ids]
    if not sparse:
        return torch.optim.AdamW(params, **options)
    if s.weight_decay:
        raise ValueError("sparse embedding tables are updated by SparseAdam, which has no weight decay: set weight_decay=0")
    dense = [p for p in params if id(p) not in sparse_ids]
    logger.info("optimizer: SparseAdam for %d sparse embedding table(s) (%s rows), AdamW for %d other tensors",
                len(sparse), f"{sum(p.shape[0] for p in sparse):,}", len(dense))
    return SparseAndDense(torch.optim.AdamW(dense, **options), torch.optim.SparseAdam(sparse, lr=s.lr, betas=BETAS))


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Engine:
    """Trains `model` on next-item batches of `data` with `loss`; see the module docstring.

    `loss_module` is the module the engine wraps in DDP / torch.compile and hands to `loss`
    (the teacher's NextItemLoss, which holds the model, so that DDP sees one forward);
    by default it is `model` itself. `step_module` replaces that DDP wrapper with a module
    that is distributed already (TorchRec's DistributedModelParallel over a sharded item
    table, pipeline/training/sharded.py), whose parameters are `model`'s. `seq_len(epoch)` caps the training window (curriculum);
    by default the model's max_len. `flops_per_token(seq_len)` adds TFLOP/s to CUDA records.
    `started` is the perf_counter origin of the records' elapsed_seconds.
    """

    def __init__(
        self,
        model: nn.Module,
        data: SequenceData,
        loss: LossFn,
        settings: EngineSettings,
        device: torch.device,
        *,
        world: Dist = SINGLE_PROCESS,
        loss_module: nn.Module | None = None,
        step_module: nn.Module | None = None,
        hooks: Hooks | None = None,
        seq_len: Callable[[int], int] | None = None,
        flops_per_token: Callable[[int], float] | None = None,
        started: float | None = None,
    ):
        if settings.restore_best and world.world_size > 1:
            raise ValueError("restore_best keeps the best weights on rank 0 only: save them from on_improve under DDP")
        self.settings, self.device, self.world = settings, device, world
        self.model = model.to(device)
        self.data = data
        self.loss = loss
        self.hooks = hooks or Hooks()
        self.seq_len = seq_len or (lambda epoch: model.cfg.max_len)
        self.flops_per_token = flops_per_token
        self.started = time.perf_counter() if started is None else started
        if step_module is None:
            step_module = loss_module if loss_module is not None else self.model
            if world.world_size > 1:
                step_module = nn.parallel.DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None)
        # dynamic=True: bucketed batches vary in length, and one graph per length would recompile all epoch.
        self.step_module = torch.compile(step_module, dynamic=True) if settings.compile else step_module
        self.optimizer = self._build_optimizer()
        self.scaler = torch.amp.GradScaler("cuda", enabled=settings.amp_dtype == torch.float16)
        self.state = TrainState()
        self.best_weights: dict[str, torch.Tensor] | None = None
        # The users each validation ranks: all with a valid target, or a fixed seeded sample of them.
        self.validation_rows = validation_sample(data, settings.validation_users, settings.seed)
        if self.validation_rows is not None:
            logger.info("validating each epoch on a seeded sample of %d users (train.validation_users)", len(self.validation_rows))

    def _build_optimizer(self) -> torch.optim.Optimizer | SparseAndDense:
        return build_optimizer(self.model, self.settings, self.device)

    # ------------------------------------------------------------------------- the run

    def fit(self) -> TrainState:
        """Train until `epochs` or early stopping; returns the state with the history of epoch records."""
        s = self.settings
        if s.reseed:
            torch.manual_seed(s.seed)
        self._start_or_resume()
        state = self.state  # after resuming: it replaces the state
        if s.validate_initial and state.epoch == -1 and not state.history and self.world.is_main:
            valid = self.validate()
            record = {"epoch": -1, "valid_ndcg10": valid[VALID_METRIC], "valid_hr10": valid["full/HR@10"]}
            state.history.append(record)
            state.best_metric = record["valid_ndcg10"]
            self._keep_best(record)
        epoch = state.epoch + 1
        while not state.stopped_early and epoch < s.epochs:
            totals = self.train_epoch(epoch)
            if self.hooks.before_validate is not None:
                self.hooks.before_validate(self.model)
            stop = self.world.is_main and self._end_epoch(epoch, totals)
            if broadcast_flag(stop, self.device, self.world):
                break
            epoch += 1
        if s.restore_best and self.best_weights is not None:
            self.model.load_state_dict(self.best_weights)
        return state

    def train_step(self, batch: Batch) -> tuple[torch.Tensor, int]:
        """One optimizer step on `batch` (already on the device); returns the summed loss and the local tokens."""
        s, world = self.settings, self.world
        with torch.autocast(self.device.type, dtype=s.amp_dtype, enabled=s.amp_dtype is not None):
            loss_sum, local_tokens = self.loss(self.step_module, batch)
        if s.token_normalisation == "global":
            loss = loss_sum * world.world_size / all_reduce_sum(local_tokens, self.device, world)
        else:
            loss = loss_sum / max(local_tokens, 1)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.hooks.after_step is not None:
            self.hooks.after_step(self.model)
        return loss_sum, local_tokens

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training batches; returns the epoch's totals summed over ranks."""
        s, device, world = self.settings, self.device, self.world
        seq_len = self.seq_len(epoch)
        self.model.train()
        epoch_started = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        n_sequences = n_tokens = 0
        loss_total = 0.0
        batches = training_batches(self.data, s.batch_size, seq_len, s.seed, epoch, world.rank, world.world_size)
        bar = tqdm(batches, total=n_training_batches(self.data, s.batch_size), desc=f"{s.desc} {epoch}", unit="batch",
                   disable=None if world.is_main else True, leave=False)
        for batch in bar:
            if device.type == "cuda":
                batch = batch.pin_memory()
            batch = batch.to(device, non_blocking=True)
            loss_sum, local_tokens = self.train_step(batch)
            n_sequences += len(batch.rows)
            n_tokens += local_tokens
            loss_total += float(loss_sum.detach())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return {
            "seq_len": seq_len, "train_seconds": time.perf_counter() - epoch_started,
            "sequences": int(all_reduce_sum(n_sequences, device, world)), "tokens": int(all_reduce_sum(n_tokens, device, world)),
            "loss_total": all_reduce_sum(loss_total, device, world),
        }

    def validate(self) -> dict[str, float]:
        """Full-ranking NDCG@10 and HR@10 on the valid split (no sampled protocols: they cost time each epoch)."""
        s = self.settings
        self.model.eval()
        return evaluate(lambda b: self.model.score(b.inputs, b.lengths), self.data, "valid", ks=(10,),
                        batch_size=s.eval_batch_size, max_len=self.model.cfg.max_len, device=self.device,
                        sampled_strategies=(), seed=s.seed, progress=False, coverage=False, rows=self.validation_rows)

    def _end_epoch(self, epoch: int, totals: dict) -> bool:
        """Rank 0: validate, record, keep the best, checkpoint, report; True when early stopping says stop."""
        s, state = self.settings, self.state
        validation_started = time.perf_counter()
        valid = self.validate()
        seconds, tokens = totals["train_seconds"], totals["tokens"]
        record = {
            "epoch": epoch, "loss": totals["loss_total"] / max(tokens, 1), "valid_ndcg10": valid[VALID_METRIC],
            "valid_hr10": valid["full/HR@10"], "train_seconds": seconds, "seq_len": totals["seq_len"],
            "valid_seconds": time.perf_counter() - validation_started, "valid_users": int(valid["users"]) if "users" in valid else None,
            "sequences_per_s": totals["sequences"] / seconds, "tokens_per_s": tokens / seconds,
            "peak_memory_mib": peak_memory_mib(self.device), "elapsed_seconds": time.perf_counter() - self.started,
        }
        if self.device.type == "cuda" and self.flops_per_token is not None:
            record["tflops"] = self.flops_per_token(totals["seq_len"]) * tokens / seconds / 1e12
        state.history.append(record)
        if record["valid_ndcg10"] > state.best_metric:
            state.best_metric, state.best_epoch, state.bad_epochs = record["valid_ndcg10"], epoch, 0
            self._keep_best(record)
        else:
            state.bad_epochs += 1
        stop = state.bad_epochs >= s.patience
        state.epoch, state.stopped_early = epoch, stop
        if s.checkpoint_path is not None:
            self.save_checkpoint(s.checkpoint_path)
        logger.info("%s %d: loss %.4f valid NDCG@10 %.4f HR@10 %.4f | %.1fs (validation %.1fs), %.0f seq/s, %.0f tok/s, "
                    "peak %.0f MiB%s", s.desc, epoch, record["loss"], record["valid_ndcg10"], record["valid_hr10"], seconds,
                    record["valid_seconds"],
                    record["sequences_per_s"], record["tokens_per_s"], record["peak_memory_mib"],
                    f", {record['tflops']:.2f} TFLOP/s" if "tflops" in record else "")
        if self.hooks.on_epoch_end is not None:
            self.hooks.on_epoch_end(record)
        if stop:
            logger.info("early stopping: no better %s for %d epochs (best %.4f at epoch %d)",
                        VALID_METRIC, s.patience, state.best_metric, state.best_epoch)
        return stop

    def _keep_best(self, record: dict) -> None:
        if self.settings.restore_best:
            self.best_weights = copy.deepcopy(self.model.state_dict())
        elif self.settings.checkpoint_best:
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        if self.hooks.on_improve is not None:
            self.hooks.on_improve(self.model, record)

    # ------------------------------------------------------------------------- checkpoints

    def _start_or_resume(self) -> None:
        path, resume = self.settings.checkpoint_path, self.settings.resume
        if path is None:
            return
        if resume and path.exists():
            self.resume_checkpoint(path)
        elif resume:
            logger.info("no checkpoint at %s: starting from scratch", path)
        else:
            # A fresh run must not leave an older run's checkpoint behind: a later --resume would load it.
            path.unlink(missing_ok=True)

    def save_checkpoint(self, path: Path) -> None:
        state = {k.name: getattr(self.state, k.name) for k in fields(TrainState) if k.name != "history"}
        # JSON for the history: records are plain values, and weights_only loading accepts a string.
        checkpoint = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                      "scaler": self.scaler.state_dict(), "torch_rng": torch.get_rng_state(), **state,
                      "history_json": json.dumps(self.state.history)}
        if self.settings.checkpoint_meta is not None:
            checkpoint["meta_json"] = json.dumps(self.settings.checkpoint_meta)
        if self.best_weights is not None:
            checkpoint["best_model"] = self.best_weights
        save_checkpoint(path, checkpoint)

    def resume_checkpoint(self, path: Path) -> None:
        checkpoint = load_checkpoint(path)
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["torch_rng"])
        if "best_model" in checkpoint and (self.settings.restore_best or self.settings.checkpoint_best):
            target = self.device if self.settings.restore_best else torch.device("cpu")
            self.best_weights = {k: v.to(target) for k, v in checkpoint["best_model"].items()}
        self.state = TrainState(**{k.name: checkpoint[k.name] for k in fields(TrainState) if k.name != "history"},
                                history=checkpoint_history(checkpoint))
        logger.info("resuming %s after epoch %d (best %s=%.4f)", path, self.state.epoch, VALID_METRIC, self.state.best_metric)
