"""The Pareto chart of a compression report: NDCG@10 against batch-1 latency, one marker per model.

Marker area is proportional to bytes on disk; the teacher and a marked model (the register stage's
candidate) have their own marker and colour, named in the legend and the title. Labels are placed so
that none overlaps another label nor a marker (where crowded markers leave no room: nor a marker's
centre): for each model in turn, the first free spot on rings of growing distance around its marker
(deterministic, no extra dependency), with a thin leader line when the label sits away from its marker.

Imports nothing heavy (matplotlib only when drawing), so the register stage draws without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.io import atomic_path

TEACHER = "teacher"
# Label placement, in pixels: the gap between a marker and its label, how many rings (one label height apart)
# to try, and the box kept clear around each marker's centre.
GAP_PX = 5.0
RINGS = 16
MARKER_CLEARANCE_PX = 3.0
# The 8 directions tried on every ring, nearest-looking first: right, above, below, left, then the diagonals.
DIRECTIONS = ((1, 0), (0, 1), (0, -1), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1))


Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in display pixels


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _first_free(point: tuple[float, float], radius: float, size: tuple[float, float], area: Box,
                blocked: list[Box]) -> tuple[tuple[float, float], Box] | None:
    """The first spot, ring by ring, for a label of `size` beside a marker of `radius` at `point`."""
    (x, y), (w, h) = point, size
    for ring in range(RINGS):
        for dx, dy in DIRECTIONS:
            # Ring 0 clears the marker; each further ring steps out by a label's height.
            cx = x + dx * (radius + GAP_PX + w / 2 + ring * h)
            cy = y + dy * (radius + GAP_PX + h / 2 + ring * h)
            box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
            inside = area[0] <= box[0] and area[1] <= box[1] and box[2] <= area[2] and box[3] <= area[3]
            if inside and not any(_overlaps(box, other) for other in blocked):
                return (cx, cy), box
    return None


def place_labels(points: list[tuple[float, float]], radii: list[float], sizes: list[tuple[float, float]],
                 area: Box) -> list[tuple[float, float]]:
    """Label centres (display pixels) for labels of `sizes` (w, h) beside markers of `radii` at `points`,
    inside `area` (x0, y0, x1, y1), greedy in the given order: none overlaps another label nor a marker; where
    the markers leave no room, a label may cover a marker's edge but never its centre nor another label.
    Where even that finds no spot (far more labels than room), the label goes right of its marker.
    """
    def around(x: float, y: float, r: float) -> Box:
        return (x - r, y - r, x + r, y + r)

    markers = [around(x, y, r) for (x, y), r in zip(points, radii, strict=True)]
    centres_only = [around(x, y, MARKER_CLEARANCE_PX) for x, y in points]
    placed: list[Box] = []
    centres = []
    for point, radius, size in zip(points, radii, sizes, strict=True):
        found = (_first_free(point, radius, size, area, placed + markers)
                 or _first_free(point, MARKER_CLEARANCE_PX, size, area, placed + centres_only))
        if found is None:
            (x, y), (w, h) = point, size
            found = (x + radius + GAP_PX + w / 2, y), (x + radius + GAP_PX, y - h / 2, x + radius + GAP_PX + w, y + h / 2)
        placed.append(found[1])
        centres.append(found[0])
    return centres


def draw_pareto(report: dict, marked: str | None = None, marked_label: str = "registered candidate") -> Any:
    """The chart as a matplotlib Figure (Agg): the teacher and `marked` (a model of the report) stand out."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    models = report["models"]
    teacher = report.get("teacher", TEACHER)
    if marked is not None and marked not in models:
        raise ValueError(f"{marked!r} is not a model of the report ({sorted(models)})")
    largest = max(r["size_bytes"] for r in models.values()) or 1
    styles = {"teacher": ("s", "tab:red"), "marked": ("D", "gold"), "variant": ("o", "tab:blue")}
    # How far each marker reaches from its centre, in units of sqrt(area): a circle's and a square's half width
    # is half its size, a diamond (a square turned 45 degrees) reaches half its diagonal.
    reach = {"s": 0.5, "o": 0.5, "D": 0.5 * 2**0.5}

    def role(name: str) -> str:
        return "marked" if name == marked else "teacher" if name == teacher else "variant"

    def area_pt2(name: str) -> float:
        return 40 + 900 * models[name]["size_bytes"] / largest

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    names = list(models)
    for name in names:
        r = models[name]
        shape, colour = styles[role(name)]
        ax.scatter(r["latency_p50_ms"], r["ndcg@10"], s=area_pt2(name), marker=shape, color=colour, alpha=0.6,
                   edgecolors="black", linewidths=1.5 if role(name) != "variant" else 0.5,
                   zorder=2 if role(name) == "variant" else 2.5)  # the marked ones on top
    ax.margins(0.2)
    threads = report["threads"]
    ax.set_xlabel(f"batch-1 latency p50, ms (CPU, {threads} thread{'' if threads == 1 else 's'}; left is faster)")
    ax.set_ylabel(f"NDCG@10 ({report['split']} split, full ranking; up is better)")
    what = ("the teacher, also the " + marked_label if marked == teacher else
            f"the teacher and the {marked_label} ({marked})" if marked else "the teacher")
    ax.set_title(f"Compression: NDCG@10 against latency (marker area ~ bytes on disk)\nmarked: {what}", fontsize=10)
    ax.grid(alpha=0.3)
    legend = [] if marked == teacher else [Line2D([], [], marker=styles["teacher"][0], color=styles["teacher"][1],
                                                  markeredgecolor="black", linestyle="", label=f"teacher\n({teacher})")]
    if marked:
        legend.append(Line2D([], [], marker=styles["marked"][0], color=styles["marked"][1], markeredgecolor="black",
                             linestyle="", label=f"{marked_label}\n({marked}{', the teacher' if marked == teacher else ''})"))
    legend.append(Line2D([], [], marker=styles["variant"][0], color=styles["variant"][1], linestyle="",
                         label="compressed\nvariant"))
    ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, labelspacing=1.2)
    fig.tight_layout()
    ax.set_xlim(ax.get_xlim())  # frozen: the labels are placed in pixels of this very layout
    ax.set_ylim(ax.get_ylim())
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()

    # Marked models first (they get the nearest spots), then left to right.
    order = sorted(names, key=lambda n: (role(n) == "variant", models[n]["latency_p50_ms"], -models[n]["ndcg@10"]))
    points = [tuple(ax.transData.transform((models[n]["latency_p50_ms"], models[n]["ndcg@10"]))) for n in order]
    # How far each marker reaches, in pixels (its area is in points^2).
    radii = [area_pt2(n) ** 0.5 * reach[styles[role(n)][0]] * fig.dpi / 72 for n in order]
    texts = []
    for name in order:
        text = ax.text(0, 0, f"{name}\n{models[name]['size_bytes'] / 1024:,.0f} KiB", fontsize=7, ha="center",
                       va="center", fontweight="bold" if role(name) != "variant" else "normal", zorder=3, gid=f"label:{name}",
                       # Leader lines pass behind other labels: a white ground keeps those legible.
                       bbox={"boxstyle": "square,pad=0", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})
        texts.append(text)
    sizes = [(b.width, b.height) for b in (t.get_window_extent(renderer) for t in texts)]
    frame = ax.get_window_extent(renderer)
    centres = place_labels(points, radii, sizes, (frame.x0, frame.y0, frame.x1, frame.y1))
    to_data = ax.transData.inverted()
    for text, point, radius, centre, (w, h) in zip(texts, points, radii, centres, sizes, strict=True):
        text.set_position(to_data.transform(centre))
        # A leader line where the label sits beyond the first ring.
        if abs(centre[0] - point[0]) > radius + w / 2 + 2 * GAP_PX or abs(centre[1] - point[1]) > radius + h / 2 + 2 * GAP_PX:
            (x0, y0), (x1, y1) = to_data.transform(point), to_data.transform(centre)
            ax.plot([x0, x1], [y0, y1], color="grey", linewidth=0.5, zorder=1)
    return fig


def pareto_chart(report: dict, target: Path, marked: str | None = None, marked_label: str = "registered candidate") -> Path:
    """`draw_pareto` written atomically to `target` (PNG)."""
    fig = draw_pareto(report, marked, marked_label)
    import matplotlib.pyplot as plt

    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png")  # no bbox_inches="tight": the labels were placed in this layout's pixels
    plt.close(fig)
    return target
