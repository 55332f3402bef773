"""The JSON summary's pieces (one entry per expectation, batch failure messages) and the Data Docs site."""

from __future__ import annotations

import datetime as dt
import math
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .rules import DATA_DOCS_SITE, KEY_HASH_REPEATED, Check

SUMMARY_FILE = "validation.json"
DATA_DOCS_DIR = "data_docs"
EXAMPLES = 5  # failing rows shown per row rule in the summary


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if value is pd.NA or value is pd.NaT:
        return None
    return str(value)


_NOTES = {
    "unique:user_id,item_id,timestamp": f"GX checks the rows where {KEY_HASH_REPEATED} is true (a sound pre-filter: "
    "rows whose key hash is unique cannot be duplicates), so element_count counts those rows only",
}


def describe(check: Check, result: Any) -> dict[str, Any]:
    """The summary's entry for one expectation: GX's verdict and counts, never its full id lists."""
    config = result.expectation_config
    body = result.result or {}
    exception = result.exception_info or {}
    note = {"note": _NOTES[check.name]} if check.name in _NOTES else {}
    return jsonable(
        note
        | {
            "check": check.name,
            "suite": check.suite,
            "expectation": config.type,
            "column": config.kwargs.get("column"),
            "columns": config.kwargs.get("column_list"),
            "kwargs": {k: v for k, v in config.kwargs.items() if k not in ("batch_id", "column", "column_list")},
            "reason": check.reason,
            "success": bool(result.success),
            "unexpected_count": body.get("unexpected_count"),
            "element_count": body.get("element_count"),
            "missing_count": body.get("missing_count"),
            "unexpected_percent": body.get("unexpected_percent"),
            "observed_value": body.get("observed_value"),
            "partial_unexpected_list": None,  # row rules: filled by `add_examples`
            "partial_unexpected_rows": None,
            "exception": exception.get("exception_message") if exception.get("raised_exception") else None,
        }
    )


def add_examples(entry: dict[str, Any], check: Check, frame: pd.DataFrame, ids: np.ndarray) -> None:
    """The first failing rows GX listed and their values (GX leaves the values out: see RESULT_FORMAT)."""
    shown = np.sort(ids)[:EXAMPLES]
    set_examples(entry, check, shown, frame.iloc[shown][list(check.columns)])


def set_examples(entry: dict[str, Any], check: Check, shown: np.ndarray, values: pd.DataFrame) -> None:
    """Entry fields for the failing rows `shown` (row ids) and their `values` (the check's columns)."""
    entry["partial_unexpected_rows"] = shown.tolist()
    if len(check.columns) == 1:
        entry["partial_unexpected_list"] = jsonable(values[check.columns[0]].tolist())
    else:
        entry["partial_unexpected_list"] = jsonable(values.to_dict(orient="records"))


def name(entry: dict[str, Any]) -> str:
    target = entry["column"] or ",".join(entry["columns"] or [])
    return f"{entry['expectation']}({target})" if target else entry["expectation"]


def batch_failure(entry: dict[str, Any], rows_in: int, min_rows: int) -> str:
    label = name(entry)
    if entry["expectation"] == "expect_column_to_exist":
        return f"{label} failed: required column {entry['column']!r} is missing"
    if entry["expectation"] == "expect_table_row_count_to_be_between":
        return f"{label} failed: {rows_in} rows < validate.min_rows {min_rows}"
    if entry["exception"]:
        return f"{label} failed: {entry['exception']}"
    expected = entry["kwargs"].get("type_list") or entry["kwargs"].get("type_")
    return f"{label} failed: observed type {entry['observed_value']!r}, expected one of {expected!r}"


# ------------------------------------------------------------------------------ Data Docs


def new_site_dir(reports_dir: Path) -> Path:
    reports_dir.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(prefix=f".{DATA_DOCS_DIR}.", dir=reports_dir))
    build_dir.chmod(0o755)  # not mkdtemp's 0700: the directory becomes the site
    return build_dir


def _swap_in(build_dir: Path, target: Path) -> Path:
    """Put the finished site `build_dir` in place of `target` (two renames, never half a site)."""
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.replace(target, old)
    os.replace(build_dir, target)
    shutil.rmtree(old, ignore_errors=True)
    return target / "index.html"


def build_data_docs(context: Any, build_dir: Path, target: Path) -> Path:
    """Render the GX site into `build_dir`, then swap it in for `target`."""
    context.build_data_docs(site_names=[DATA_DOCS_SITE])
    if not (build_dir / "index.html").exists():
        raise RuntimeError(f"GX built no Data Docs index in {build_dir}")
    return _swap_in(build_dir, target)


def data_docs_placeholder(reports_dir: Path, target: Path) -> None:
    """With data_docs off, `target` still exists (dvc.yaml lists it as an output) and holds a
    page saying so rather than an earlier run's site."""
    build_dir = new_site_dir(reports_dir)
    (build_dir / "index.html").write_text(
        "<!doctype html><title>LeanRec validation</title>"
        f"<p>Data Docs were not built: validate.data_docs is false. See ../{SUMMARY_FILE}.</p>\n",
        encoding="utf-8",
    )
    _swap_in(build_dir, target)
