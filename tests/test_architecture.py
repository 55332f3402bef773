"""The layering of docs/architecture.md, enforced: import-linter's contracts and ruff pass, and they can fail.

The contracts live in pyproject.toml ([tool.importlinter]): packages in layers, no cycles between
sibling modules or packages at any depth, no module importing another's private names.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAX_MODULE_LINES = 420  # "about 400": a module past it is split by concern


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lint-imports"), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_ruff_is_clean():
    result = subprocess.run([str(BIN / "ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("module", "line", "broken"), [
    # foundation importing the top layer
    ("core/io.py", "from pipeline.orchestration import cli  # noqa", "pipeline.core is not allowed to import pipeline.orchestration"),
    # two sibling modules importing each other (models.sparse already imports models.sasrec)
    ("models/sasrec.py", "from pipeline.models import sparse  # noqa", "No cycles are allowed in pipeline.models"),
    # a lazy import of another module's private name
    ("serving/batch.py", "def probe():\n    from pipeline.registry.store import _hidden  # noqa",
     "imports _hidden from pipeline.registry.store"),
])
def test_a_reversed_import_breaks_a_contract(tmp_path, module, line, broken):
    for name in ("pipeline", "tests/__init__.py", "tests/architecture_contracts.py", "pyproject.toml"):
        source, target = ROOT / name, tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    assert _lint_imports(tmp_path).returncode == 0  # the copy is clean before the change
    with (tmp_path / "pipeline" / module).open("a", encoding="utf-8") as handle:
        handle.write(f"\n{line}\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert broken in " ".join(result.stdout.split()), result.stdout


def test_no_module_outgrows_one_concern():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines()) for p in (ROOT / "pipeline").rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_every_package_is_described_in_the_architecture_page():
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    packages = sorted(p.parent.relative_to(ROOT) for p in (ROOT / "pipeline").rglob("__init__.py") if p.parent != ROOT / "pipeline")
    missing = [str(p) for p in packages if f"`{p}/`" not in page]
    assert not missing, f"docs/architecture.md does not describe {missing}"
