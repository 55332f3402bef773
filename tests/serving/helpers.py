"""Shared by the tests of pipeline.serving."""

from __future__ import annotations


def full_history(served: dict, row: int) -> list[int]:
    """The item indices of features row `row`, oldest first (what serving scores for that user)."""
    data = served["data"]
    return data.items[data.offsets[row] : data.offsets[row + 1]].tolist()
