"""The README's two setup commands are what users and CI run: keep them honest."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)[:2]


def test_readme_opens_with_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    head = text.split("\n## ", 1)[0]
    assert head.count("```bash") == 2, "README must open with exactly two commands"
    run_cmd, test_cmd = _readme_commands()
    assert "dvc repro" in run_cmd and "constraints.txt" in run_cmd
    assert "pytest" in test_cmd and "constraints.txt" in test_cmd


def test_ci_runs_the_readme_test_command_verbatim():
    _, test_cmd = _readme_commands()
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test_cmd in ci_lines


def test_every_dependency_is_pinned():
    constraints = (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines()
    # "--find-links packaging/wheels": a pip option line, not a pin
    entries = [line for line in constraints if line.strip() and not line.startswith(("#", "--"))]
    assert entries and all("==" in line for line in entries)
    assert "torch==2.13.0" in entries
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    # "leanrec[stack]": an extra naming another extra of this project, pinned by what it names
    deps = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra
                                      if not d.startswith("leanrec[")]
    assert deps and all("==" in dep for dep in deps), deps
