"""The package layering the README's Layout section promises: `projectionist/` is the floor both
processes stand on, so it imports neither of them; only the launcher imports both."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def imported_packages(package: str) -> dict[str, set[str]]:
    """{module path: top-level packages it imports}, from the source (every import, lazy ones too)."""
    found = {}
    for path in (REPO / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names
    return found


def test_the_shared_floor_imports_neither_process():
    offenders = {path: names & {"proxy_addons", "control", "launcher"}
                 for path, names in imported_packages("projectionist").items()}
    assert not {path: names for path, names in offenders.items() if names}


def test_the_processes_do_not_import_each_other_or_the_launcher():
    for package, others in (("proxy_addons", {"control", "launcher"}), ("control", {"proxy_addons", "launcher"})):
        offenders = {path: names & others for path, names in imported_packages(package).items() if names & others}
        assert not offenders, f"{package} imports {offenders}"
