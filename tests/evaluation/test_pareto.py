"""The Pareto chart (pipeline/evaluation/pareto.py): written as a PNG, readable labels, the teacher and
the marked model told apart."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from pipeline.evaluation.pareto import draw_pareto, pareto_chart, place_labels

NAMES = ("teacher", "int8", "int8_table", "fp16", "pruned", "lowrank", "pq", "distilled", "int4_table", "coded", "sparse")


def _report() -> dict:
    """11 models as a real report has them: ten variants within a few hundredths of a millisecond and of NDCG@10
    of each other, the teacher apart (so the variants crowd into a corner of the axes)."""
    models = {name: {"latency_p50_ms": 0.5 + 0.01 * i, "ndcg@10": 0.30 + 0.0005 * (i % 4), "size_bytes": 100_000 * (11 - i)}
              for i, name in enumerate(NAMES)}
    models["teacher"].update(latency_p50_ms=1.6, **{"ndcg@10": 0.31})
    return {"split": "test", "threads": 2, "teacher": "teacher", "models": models}


def _labels(fig) -> dict[str, object]:
    (ax,) = fig.axes
    return {t.get_gid().removeprefix("label:"): t for t in ax.texts if (t.get_gid() or "").startswith("label:")}


def test_the_chart_is_written_as_a_png(tmp_path):
    target = pareto_chart(_report(), tmp_path / "reports" / "compression.png", marked="int8_table")
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(target.parent.iterdir()) == [target]  # written atomically: no temporary file left


def test_no_two_labels_overlap_nor_leave_the_axes():
    fig = draw_pareto(_report(), marked="int8_table")
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        labels = _labels(fig)
        assert sorted(labels) == sorted(NAMES)
        boxes = {name: text.get_window_extent(renderer) for name, text in labels.items()}
        frame = fig.axes[0].get_window_extent(renderer)
        for name, box in boxes.items():
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, name
            for other, other_box in boxes.items():
                if other != name:
                    assert not box.overlaps(other_box), f"the labels of {name} and {other} overlap"
    finally:
        plt.close(fig)


def test_the_teacher_and_the_marked_model_are_named_in_the_legend_and_title():
    fig = draw_pareto(_report(), marked="int8_table")
    try:
        (ax,) = fig.axes
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend == ["teacher\n(teacher)", "registered candidate\n(int8_table)", "compressed\nvariant"]
        assert "marked: the teacher and the registered candidate (int8_table)" in ax.get_title()
        labels = _labels(fig)
        assert labels["teacher"].get_fontweight() == labels["int8_table"].get_fontweight() == "bold"
        assert labels["int8"].get_fontweight() == "normal"
    finally:
        plt.close(fig)
    unmarked = draw_pareto(_report())
    try:
        assert unmarked.axes[0].get_title().endswith("marked: the teacher")
        assert len(unmarked.axes[0].get_legend().get_texts()) == 2
    finally:
        plt.close(unmarked)


def test_a_marked_teacher_is_drawn_once_as_the_marked_model():
    fig = draw_pareto(_report(), marked="teacher", marked_label="registered candidate")
    try:
        (ax,) = fig.axes
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["registered candidate\n(teacher, the teacher)",
                                                                      "compressed\nvariant"]
        assert "marked: the teacher, also the registered candidate" in ax.get_title()
    finally:
        plt.close(fig)


def test_a_marked_model_not_in_the_report_is_refused():
    with pytest.raises(ValueError, match="'pq4' is not a model of the report"):
        draw_pareto(_report(), marked="pq4")


def test_labels_of_markers_at_one_spot_are_spread_apart():
    # Five markers on the same pixel: every label still finds its own spot, clear of the others.
    centres = place_labels([(100.0, 100.0)] * 5, [8.0] * 5, [(40.0, 12.0)] * 5, (0.0, 0.0, 400.0, 300.0))
    boxes = [(x - 20, y - 6, x + 20, y + 6) for x, y in centres]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])
