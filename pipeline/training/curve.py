"""The training curve of a run as one picture: mean training loss and validation NDCG@10 by epoch.

For MLflow (the train run's artifact plots/training_curve.png), where a reader opens one run and
looks; DVC draws its own plots from models/<run>/history.json (dvc.yaml `plots`).
"""

from __future__ import annotations

from typing import Any

CURVE_ARTIFACT = "plots/training_curve.png"


def training_curve(history: list[dict], title: str) -> Any:
    """Two panels over one epoch axis: the loss (top) and validation NDCG@10 (bottom), the best epoch marked.

    A record without a loss (the validation before the first epoch, epoch -1) is in the NDCG panel only.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    trained = [r for r in history if "loss" in r]
    validated = [r for r in history if "valid_ndcg10" in r]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 5.5), dpi=110)
    top.plot([r["epoch"] for r in trained], [r["loss"] for r in trained], marker="o", color="tab:red")
    top.set_ylabel("training loss\n(mean per target item)")
    top.set_title("Training loss per epoch")
    bottom.plot([r["epoch"] for r in validated], [r["valid_ndcg10"] for r in validated], marker="o", color="tab:blue")
    if validated:
        best = max(validated, key=lambda r: r["valid_ndcg10"])
        bottom.scatter([best["epoch"]], [best["valid_ndcg10"]], s=120, facecolors="none", edgecolors="black", zorder=3,
                       label=f"best: epoch {best['epoch']}, {best['valid_ndcg10']:.4f} (weights kept)")
        bottom.legend(loc="lower right", fontsize=8)
    bottom.set_ylabel("validation NDCG@10\n(full ranking)")
    bottom.set_title("Validation NDCG@10 after each epoch")
    bottom.set_xlabel("epoch")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def log_training_curve(history: list[dict], title: str) -> None:
    """`training_curve` into the active MLflow run as CURVE_ARTIFACT."""
    import matplotlib.pyplot as plt

    import mlflow

    fig = training_curve(history, title)
    try:
        mlflow.log_figure(fig, CURVE_ARTIFACT)
    finally:
        plt.close(fig)
