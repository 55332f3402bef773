import torch

from pipeline.compression.distill import build_student
from pipeline.models.sasrec import SASRec, SASRecConfig


def _teacher() -> SASRec:
    torch.manual_seed(0)
    return SASRec(SASRecConfig(n_items=40, d_model=16, n_layers=3, n_heads=2, max_len=10, dropout=0.0)).eval()


def test_a_student_as_wide_as_the_teacher_starts_as_its_first_blocks():
    teacher = _teacher()
    student = build_student(teacher, d_model=16, n_layers=1, n_heads=2).eval()
    truncated = _teacher()
    del truncated.blocks[1:]  # the teacher without its last two blocks: what the student must compute
    items, lengths = torch.randint(1, 41, (4, 10)), torch.tensor([10, 4, 1, 7])
    with torch.no_grad():
        torch.testing.assert_close(student.last_hidden(items, lengths), truncated.last_hidden(items, lengths))
        assert not torch.allclose(student.last_hidden(items, lengths), teacher.last_hidden(items, lengths))
    student.item_embedding.weight.data.zero_()  # copies, not shared tensors: training the student leaves the teacher alone
    assert teacher.item_embedding.weight.abs().sum() > 0


def test_a_narrower_student_starts_from_the_projected_table_only():
    teacher = _teacher()
    student = build_student(teacher, d_model=8, n_layers=1, n_heads=1)
    table = teacher.item_embedding.weight.detach()
    # the student's item similarities are the teacher's best rank-8 approximation of them (up to scale)
    similarity = student.item_embedding.weight.detach() @ student.item_embedding.weight.detach().T
    u, s, vh = torch.linalg.svd(table, full_matrices=False)
    best = (u[:, :8] * s[:8]) @ (u[:, :8] * s[:8]).T
    torch.testing.assert_close(similarity / similarity.abs().max(), best / best.abs().max(), atol=1e-4, rtol=1e-4)
    fresh = build_student(teacher, 16, 1, 2, init_from_teacher=False)
    assert not torch.equal(fresh.item_embedding.weight, teacher.item_embedding.weight)
    assert not torch.equal(fresh.blocks[0].ffn[0].weight, teacher.blocks[0].ffn[0].weight)
