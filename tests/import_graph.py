"""The files of `pipeline` a set of entry modules needs, from grimp's import graph (lazy imports included).

tests/test_dvc_deps.py (a stage's code deps) and tests/serving/test_pyfunc.py (the code the served
model ships) both ask this question of the same graph.
"""

from __future__ import annotations

from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def module_file(module: str) -> Path:
    """`pipeline.data.features` -> pipeline/data/features.py; a package -> its __init__.py (relative to ROOT)."""
    path = Path(*module.split("."))
    return path / "__init__.py" if (ROOT / path).is_dir() else path.with_suffix(".py")


def imported_files(graph: grimp.ImportGraph, entries: tuple[str, ...]) -> set[Path]:
    """The entry modules and every module they import, directly or not, as files; packages' __init__.py left out."""
    used = set(entries)
    for entry in entries:
        used |= graph.find_upstream_modules(entry)
    return {file for file in map(module_file, used) if file.name != "__init__.py"}
