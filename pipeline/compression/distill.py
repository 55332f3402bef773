"""Distillation: a smaller student and the loss that trains it on the teacher's outputs.

The training itself is the engine's (pipeline/training/engine.py, called from
pipeline/compression/compress.py), as for the fine-tunes after pruning and factorising.

Distillation trains a smaller student on the teacher's output distribution at
every position of every training sequence: a temperature-softened KL
divergence to the teacher over the whole catalogue, or over the teacher's
top-k items only, plus cross-entropy on the true next item:

    loss = alpha * CE(student, next item) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

The T^2 factor keeps the gradient scale of the soft term independent of T
(Hinton et al., 2015).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.data.sequences import Batch
from pipeline.models.sasrec import SASRec, SASRecConfig
from pipeline.training.losses import LossFn


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


def build_student(teacher: SASRec, d_model: int, n_layers: int, n_heads: int, init_from_teacher: bool = True) -> SASRec:
    """A narrower or shallower SASRec over the same catalogue and history length.

    With `init_from_teacher`, its item table starts as the teacher's table projected on
    its top `d_model` singular directions (the best rank-d_model start in the least-squares
    sense), so item similarity is there from the first step. A student as wide as the teacher,
    with as many heads, starts from the teacher's own weights instead (`copy_teacher_layers`).
    """
    cfg = SASRecConfig(n_items=teacher.cfg.n_items, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       max_len=teacher.cfg.max_len, ffn_multiplier=teacher.cfg.ffn_multiplier, dropout=teacher.cfg.dropout)
    student = SASRec(cfg)
    if not init_from_teacher:
        return student
    if (d_model, n_heads) == (teacher.cfg.d_model, teacher.cfg.n_heads) and n_layers <= teacher.cfg.n_layers:
        copy_teacher_layers(student, teacher)
    elif d_model <= teacher.cfg.d_model:
        table = teacher.item_embedding.weight.detach().float().cpu()
        u, s, _ = torch.linalg.svd(table, full_matrices=False)
        projected = u[:, :d_model] * s[:d_model]
        # Match the teacher's per-value scale: the encoder multiplies lookups by sqrt(d).
        projected *= table.std() / projected.std().clamp(min=1e-12)
        with torch.no_grad():
            student.item_embedding.weight.copy_(projected)
            student.item_embedding.weight[0].zero_()
    return student


def copy_teacher_layers(student: SASRec, teacher: SASRec) -> None:
    """Item table, positions, final norm and the teacher's first `n_layers` blocks into a same-width student."""
    state = teacher.state_dict()
    kept = {k: v for k, v in state.items() if not k.startswith("blocks.") or int(k.split(".")[1]) < student.cfg.n_layers}
    student.load_state_dict({k: v.detach().clone() for k, v in kept.items()})
