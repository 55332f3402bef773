"""The configuration reference (docs/configuration.md), generated from the models of pipeline/core/config.py."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from pipeline.core.config import Params


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "").replace("datetime.", "")
    return text.replace("|", "\\|")  # a bare | would split the markdown table cell


def reference_markdown() -> str:
    """The configuration reference (docs/configuration.md), generated from the models of pipeline/core/config.py."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `pipeline/core/config.py` by `python -m pipeline config-reference > docs/configuration.md`;",
        "a test fails when this page is stale. Every key lives in `params.yaml`; override one for a run",
        "with `-S key=value` (CLI) or `dvc exp run -S key=value`.",
        "",
    ]

    def walk(model: type[BaseModel], prefix: str) -> None:
        rows, sections = [], []
        for name, info in model.model_fields.items():
            key = f"{prefix}{info.alias or name}"
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                sections.append((annotation, f"{key}."))
                continue
            default = info.get_default(call_default_factory=True)
            symbols = {"Ge": ">=", "Gt": ">", "Le": "<=", "Lt": "<"}
            limits = [f"{symbols[type(m).__name__]} {getattr(m, type(m).__name__.lower())}"
                      for m in info.metadata if type(m).__name__ in symbols]
            notes = "; ".join(filter(None, [info.description or "", ", ".join(limits)]))
            rows.append(f"| `{key}` | `{_type_name(annotation)}` | `{json.dumps(default, default=str)}` | {notes} |")
        if rows:
            title = prefix.rstrip(".") or "(top level)"
            lines.extend([f"## `{title}`", "", "| key | type | default | notes |", "| --- | --- | --- | --- |", *rows, ""])
        for section, section_prefix in sections:
            walk(section, section_prefix)

    walk(Params, "")
    return "\n".join(lines).rstrip() + "\n"
