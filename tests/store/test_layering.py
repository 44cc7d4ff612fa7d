"""store/ is the bottom of the data flow: it imports only itself, errors and config_text; jobs/ never imports cli/."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "qmpbackup"


def project_imports(module: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qmpbackup"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("qmpbackup"))
    return found


def test_store_imports() -> None:
    for module in (PACKAGE / "store").glob("*.py"):
        for name in project_imports(module):
            # config_text: the one parser of whole numbers in config values (it imports only errors)
            assert name.startswith("qmpbackup.store") or name in ("qmpbackup.errors", "qmpbackup.config_text"), (
                module.name, name)
    assert project_imports(PACKAGE / "store" / "names.py") == set()


def test_jobs_does_not_import_cli() -> None:
    for module in (PACKAGE / "jobs").glob("*.py"):
        assert not any(n.startswith("qmpbackup.cli") for n in project_imports(module)), module.name
