"""The tree is the data flow: imports only run down the floors below.

Floors, lowest first: the record schema and errors; what is kept on disk
(``store``) and the backends; templates (rendered by a backend); the
pipeline and its stages; the run settings; the library behind each command;
the CLI.  A module may import its own floor or any floor below it, never one
above (a lazy import inside a function counts too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "magpie"

FLOORS: dict[str, int] = {
    "magpie": 0,
    "magpie.errors": 0,
    "magpie.records": 0,
    "magpie.prompts": 0,
    "magpie.store": 1,
    "magpie.backends": 1,
    "magpie.templates": 2,
    "magpie.pipeline": 3,
    "magpie.settings": 4,
    "magpie.commands": 5,
    "magpie.cli": 6,
    "magpie.__main__": 6,
}
#: Areas of one floor that must not import each other.
APART = {frozenset({"magpie.store", "magpie.backends"})}


def area(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def modules() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.split(".")[0] == "magpie":
                    found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.split(".")[0] == "magpie"}
        graph[name] = found
    return graph


GRAPH = modules()


def test_every_area_has_a_floor() -> None:
    assert {area(m) for m in GRAPH} <= set(FLOORS)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_run_down_the_floors(module: str) -> None:
    mine = area(module)
    upward = []
    for target in sorted(GRAPH[module]):
        theirs = area(target)
        if FLOORS[theirs] > FLOORS[mine] or theirs != mine and frozenset({mine, theirs}) in APART:
            upward.append(target)
    assert not upward, f"{module} imports against the flow: {upward}"


def test_stages_know_nothing_of_the_scheduler() -> None:
    for module, targets in GRAPH.items():
        if module.startswith("magpie.pipeline.stages"):
            assert "magpie.pipeline.scheduler" not in targets, module


def test_no_relative_imports() -> None:
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}: relative import"


TESTS = Path(__file__).resolve().parent
#: Folders of tests/ that are not a package of src/magpie: the doubles and
#: helpers, and the real-server and Ray tiers.
NOT_MIRRORS = {"support", "real", "ray"}


def test_the_tests_mirror_the_source() -> None:
    """tests/<area>/ holds the tests of src/magpie/<area>/ (DEVELOPERS.md)."""
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
    areas = {name.split(".")[1] for name in FLOORS if "." in name}
    assert folders - NOT_MIRRORS <= areas
    loose = sorted(p.name for p in TESTS.glob("test_*.py"))
    assert loose == ["test_layout.py", "test_readme.py"], "put a test under the folder of its area"


def test_test_modules_have_unique_names() -> None:
    """Test folders are not packages (but real/): pytest imports a test module
    by its file name, so two of one name would collide."""
    names = [p.name for p in TESTS.rglob("test_*.py") if "real" not in p.parts]
    assert len(names) == len(set(names))
