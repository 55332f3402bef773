"""dvc.yaml's code dependencies follow the import graph: a code change reruns exactly the stages it can affect.

Each stage's entry modules (what the CLI calls for it) and every module they import, directly or
lazily, must be listed in the stage's `deps` (as the module's file, or as the package directory when
the stage imports all of it), and nothing else of `pipeline/` may be listed. The CLI wiring
(`pipeline/orchestration`) is left out on purpose: it only passes params and paths.

`python -m tests.test_dvc_deps` prints the expected code deps of every stage.
"""

from __future__ import annotations

from pathlib import Path

import grimp
import yaml

from tests.import_graph import ROOT, imported_files

# Stage -> the modules whose functions the CLI runs for it. promote and recommend load the registered
# pyfunc, so the servable's code decides their results too.
STAGE_ENTRIES: dict[str, tuple[str, ...]] = {
    "ingest": ("pipeline.data.ingest",),
    "validate": ("pipeline.data.validation.stage",),
    "features": ("pipeline.data.features", "pipeline.data.features_outofcore"),  # by data_engine
    "train": ("pipeline.training.train",),
    "compress": ("pipeline.compression.compress",),
    "evaluate": ("pipeline.evaluation.evaluate",),
    "register": ("pipeline.registry.register", "pipeline.evaluation.summary"),
    "promote": ("pipeline.registry.promote", "pipeline.serving.pyfunc"),
    "recommend": ("pipeline.serving.batch", "pipeline.registry.store"),
}


def expected_code_deps(graph: grimp.ImportGraph, entries: tuple[str, ...]) -> list[str]:
    """The stage's modules as dvc.yaml paths: a package directory when every module in it is used, else files."""
    files = imported_files(graph, entries)

    def all_used(directory: Path) -> bool:
        return all(p.relative_to(ROOT) in files for p in (ROOT / directory).rglob("*.py") if p.name != "__init__.py")

    deps: set[str] = set()
    for file in files:
        top = file.parent
        # The highest package directory (below pipeline/) whose modules the stage uses in full.
        candidate = None
        while top != Path("pipeline"):
            if all_used(top):
                candidate = top
            top = top.parent
        deps.add(str(candidate) if candidate is not None else str(file))
    return sorted(deps)


def _listed_code_deps(stage: dict) -> list[str]:
    return sorted(d for d in stage.get("deps", []) if str(d).startswith("pipeline/"))


def test_every_stage_lists_exactly_the_code_it_imports():
    graph = grimp.build_graph("pipeline")
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert set(STAGE_ENTRIES) == set(stages), "a new stage needs its entry modules in STAGE_ENTRIES"
    wrong = {}
    for name, entries in STAGE_ENTRIES.items():
        expected, listed = expected_code_deps(graph, entries), _listed_code_deps(stages[name])
        if expected != listed:
            wrong[name] = {"expected": expected, "listed": listed}
    assert not wrong, f"dvc.yaml code deps differ from the import graph (python -m tests.test_dvc_deps): {wrong}"


def test_the_check_sees_a_missing_dependency():
    """A stage that drops one of the modules it imports is told apart."""
    graph = grimp.build_graph("pipeline")
    expected = expected_code_deps(graph, STAGE_ENTRIES["train"])
    assert "pipeline/evaluation/metrics.py" in expected  # early stopping decides the kept weights
    assert expected_code_deps(graph, STAGE_ENTRIES["ingest"]) != expected


if __name__ == "__main__":
    graph = grimp.build_graph("pipeline")
    for name, entries in STAGE_ENTRIES.items():
        print(f"{name}:")
        for dep in expected_code_deps(graph, entries):
            print(f"  - {dep}")
