"""The two floors (docs/design.md#two-floors): stage modules compose the library and never import each
other, the library never imports a stage, so an edit to one stage re-runs that stage only."""

import ast
from pathlib import Path

import pytest

from pipeline.registry import STAGES

ROOT = Path(__file__).resolve().parent.parent
STAGE_FILES = sorted((ROOT / "pipeline" / "stages").glob("[a-z]*.py"))
LIBRARY_FILES = sorted(p for p in (ROOT / "pipeline").rglob("*.py") if "stages" not in p.relative_to(ROOT).parts)


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, lazy imports included (``from pipeline.stages import x`` counts as
    ``pipeline.stages.x``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def stage_imports(path: Path) -> set[str]:
    return {m for m in imported_modules(path) if m.startswith("pipeline.stages.")}


def test_every_stage_has_a_module():
    assert {p.stem for p in STAGE_FILES} == set(STAGES)


@pytest.mark.parametrize("path", STAGE_FILES, ids=lambda p: p.stem)
def test_a_stage_module_imports_no_other_stage(path):
    assert stage_imports(path) == set(), f"{path.name} imports another stage: compose the library instead"


@pytest.mark.parametrize("path", LIBRARY_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_imports_no_stage(path):
    allowed = {"pipeline/registry.py", "pipeline/cli.py"}  # they look stages up by name, computing nothing
    if str(path.relative_to(ROOT)) in allowed:
        return
    assert stage_imports(path) == set(), f"{path.name} imports a stage module"


def test_the_check_catches_a_stage_importing_a_stage(tmp_path):
    bad = tmp_path / "head.py"
    bad.write_text("from pipeline.stages.features import run\nfrom pipeline.stages import split\n")
    assert stage_imports(bad) == {"pipeline.stages.features", "pipeline.stages.features.run", "pipeline.stages.split"}
