"""An import-linter contract type that import-linter lacks: no module imports another's private names.

`lint-imports` loads it through `contract_types` in pyproject.toml. Its graph knows which modules import
which, not the names they take, so this contract reads each module's `from ... import ...` statements
(lazy imports inside functions included) with `ast`.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from importlinter import Contract, ContractCheck, fields, output


def private_imports(module: str, path: Path, container: str) -> list[str]:
    """`module imports _name from other` lines for every private name `module` takes from another module of `container`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if not isinstance(node, ast.ImportFrom) or not node.module or node.level:
            continue
        source = node.module
        if source != container and not source.startswith(container + "."):
            continue
        for alias in node.names:
            if alias.name.startswith("_") and source != module:
                found.append(f"{module} imports {alias.name} from {source} (l.{node.lineno})")
    return found


class PrivateNamesContract(Contract):
    """Modules of `containers` import only public names (no leading underscore) from each other."""

    type_name = "private_names"
    containers = fields.ListField(subfield=fields.StringField())

    def check(self, graph, verbose: bool) -> ContractCheck:
        violations: list[str] = []
        for container in self.containers:  # type: ignore[attr-defined]
            for module in sorted(graph.find_descendants(container) | {container}):
                spec = importlib.util.find_spec(module)
                if spec is None or not spec.origin or not spec.origin.endswith(".py"):
                    continue
                violations += private_imports(module, Path(spec.origin), container)
        return ContractCheck(kept=not violations, metadata={"violations": violations})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for violation in check.metadata["violations"]:
            output.print_error(f"- {violation}", bold=False)
        output.new_line()
        output.print("Make the name public in the module that owns it, or move the code that needs it there.")
