"""Short training loops for compressed models: fine-tuning after pruning or factorising, and distillation.

`fit` trains any SASRec-shaped model on the next-item task of the features'
training prefixes, validates on the valid split every epoch and keeps the best
weights (the same protocol as pipeline/training/train.py, without its DDP and
checkpoint machinery: these runs take seconds to minutes).

Distillation trains a smaller student on the teacher's output distribution at
every position of every training sequence: a temperature-softened KL
divergence to the teacher over the whole catalogue, or over the teacher's
top-k items only, plus cross-entropy on the true next item:

    loss = alpha * CE(student, next item) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

The T^2 factor keeps the gradient scale of the soft term independent of T
(Hinton et al., 2015).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.data.sequences import Batch, SequenceData, n_training_batches, training_batches
from pipeline.evaluation.metrics import evaluate
from pipeline.models.sasrec import SASRec, SASRecConfig

logger = logging.getLogger(__name__)

# (model, batch) -> (summed loss over real positions, number of real positions)
LossFn = Callable[[SASRec, Batch], tuple[torch.Tensor, int]]


def next_item_loss(model: SASRec, batch: Batch) -> tuple[torch.Tensor, int]:
    hidden = model(batch.inputs)
    mask = batch.targets != 0
    logits = model.logits(hidden[mask])[:, 1:]  # column 0 is padding, never a next item
    return F.cross_entropy(logits, batch.targets[mask] - 1, reduction="sum"), int(mask.sum())


def distillation_loss(teacher: SASRec, temperature: float, alpha: float, top_k: int | None) -> LossFn:
    teacher = teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss(student: SASRec, batch: Batch) -> tuple[torch.Tensor, int]:
        mask = batch.targets != 0
        student_logits = student.logits(student(batch.inputs)[mask])[:, 1:]
        with torch.no_grad():
            teacher_logits = teacher.logits(teacher(batch.inputs)[mask])[:, 1:]
        hard = F.cross_entropy(student_logits, batch.targets[mask] - 1, reduction="sum")
        if top_k is not None:
            top = torch.topk(teacher_logits, min(top_k, teacher_logits.shape[1]), dim=1).indices
            teacher_logits, student_logits_soft = teacher_logits.gather(1, top), student_logits.gather(1, top)
        else:
            student_logits_soft = student_logits
        soft = F.kl_div(F.log_softmax(student_logits_soft / temperature, dim=1),
                        F.log_softmax(teacher_logits / temperature, dim=1), log_target=True, reduction="sum")
        return alpha * hard + (1.0 - alpha) * temperature**2 * soft, int(mask.sum())

    return loss


def valid_ndcg10(model: SASRec, data: SequenceData, device: torch.device, batch_size: int, seed: int) -> float:
    model.eval()
    metrics = evaluate(lambda b: model.score(b.inputs, b.lengths), data, "valid", ks=(10,), batch_size=batch_size,
                       max_len=model.cfg.max_len, device=device, sampled_strategies=(), seed=seed, progress=False)
    return metrics["full/NDCG@10"]


def fit(
    model: SASRec,
    data: SequenceData,
    loss_fn: LossFn,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: torch.device,
    patience: int = 3,
    eval_batch_size: int = 512,
    after_step: Callable[[SASRec], None] | None = None,
    desc: str = "fit",
) -> list[dict]:
    """Train `model` in place for up to `epochs`; it ends holding its best-validation weights.

    `after_step` runs after every optimizer step (pruning uses it to keep pruned weights at zero).
    Epoch -1 in the returned history is the model as it came in: if no epoch beats it, it is kept.
    """
    model.to(device)
    torch.manual_seed(seed)
    best_metric = valid_ndcg10(model, data, device, eval_batch_size, seed)
    best_state = copy.deepcopy(model.state_dict())
    history = [{"epoch": -1, "valid_ndcg10": best_metric}]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.98))
    bad_epochs = 0
    for epoch in range(epochs):
        model.train()
        total, tokens = 0.0, 0
        batches = training_batches(data, batch_size, model.cfg.max_len, seed, epoch)
        for batch in tqdm(batches, total=n_training_batches(data, batch_size), desc=f"{desc} {epoch}", unit="batch",
                          leave=False, disable=None):
            batch = batch.to(device)
            loss_sum, n_tokens = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            (loss_sum / max(n_tokens, 1)).backward()
            optimizer.step()
            if after_step is not None:
                after_step(model)
            total += float(loss_sum.detach())
            tokens += n_tokens
        metric = valid_ndcg10(model, data, device, eval_batch_size, seed)
        history.append({"epoch": epoch, "loss": total / max(tokens, 1), "valid_ndcg10": metric})
        logger.info("%s epoch %d: loss %.4f valid NDCG@10 %.4f", desc, epoch, total / max(tokens, 1), metric)
        if metric > best_metric:
            best_metric, best_state, bad_epochs = metric, copy.deepcopy(model.state_dict()), 0
        else:
            bad_epochs += 1
            if bad_epochs >= patience:
                break
    model.load_state_dict(best_state)
    return history


def build_student(teacher: SASRec, d_model: int, n_layers: int, n_heads: int, init_from_teacher: bool = True) -> SASRec:
    """A narrower, shallower SASRec over the same catalogue and history length.

    With `init_from_teacher`, its item table starts as the teacher's table projected on
    its top `d_model` singular directions (the best rank-d_model start in the least-squares
    sense), so item similarity is there from the first step.
    """
    cfg = SASRecConfig(n_items=teacher.cfg.n_items, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       max_len=teacher.cfg.max_len, ffn_multiplier=teacher.cfg.ffn_multiplier, dropout=teacher.cfg.dropout)
    student = SASRec(cfg)
    if init_from_teacher and d_model <= teacher.cfg.d_model:
        table = teacher.item_embedding.weight.detach().float().cpu()
        u, s, _ = torch.linalg.svd(table, full_matrices=False)
        projected = u[:, :d_model] * s[:d_model]
        # Match the teacher's per-value scale: the encoder multiplies lookups by sqrt(d).
        projected *= table.std() / projected.std().clamp(min=1e-12)
        with torch.no_grad():
            student.item_embedding.weight.copy_(projected)
            student.item_embedding.weight[0].zero_()
    return student
