"""The locked environment: requirements.lock pins everything pyproject.toml declares, inside its
ranges; the venv holds what the lock pins; every third-party module the code imports is declared.
A failure here means `make lock` (pyproject changed) or `make install` (the venv is stale)."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SOURCE_DIRS = ("pipeline", "flows", "benchmarks")
# A benchmark script may import a sibling script (benchmarks/ is on the path when it runs).
FIRST_PARTY = {"pipeline", "flows", "benchmarks", "tests"} | {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)(?P<rest>.*)$")


def lock_entries() -> dict[str, tuple[str, str]]:
    """Canonical name -> (pinned version, the rest of the entry: markers, hashes)."""
    logical = re.sub(r"\\\n", " ", LOCK.read_text())  # join `\`-continued lines
    entries: dict[str, tuple[str, str]] = {}
    for line in logical.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"requirements.lock: not an exact `name==version` pin: {line[:80]!r}"
        entries[canonicalize_name(match["name"])] = (match["version"], match["rest"])
    return entries


def lock_pins() -> dict[str, str]:
    return {name: version for name, (version, _) in lock_entries().items()}


def declared() -> list[Requirement]:
    """Runtime dependencies, every optional extra and the build backend, as pyproject declares them."""
    project = PYPROJECT["project"]
    found = [Requirement(r) for r in project["dependencies"]]
    found += [Requirement(r) for extra in project.get("optional-dependencies", {}).values() for r in extra]
    found += [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    return [r for r in found if r.marker is None or r.marker.evaluate()]


def declared_names() -> set[str]:
    return {canonicalize_name(r.name) for r in declared()}


def installed_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------- lock vs pyproject


def test_every_lock_entry_is_an_exact_pin_with_hashes():
    entries = lock_entries()
    assert len(entries) > 50, "requirements.lock should pin the transitive closure, not only the direct deps"
    unhashed = sorted(name for name, (_, rest) in entries.items() if "--hash=sha256:" not in rest)
    assert not unhashed, f"entries without --hash (pip --require-hashes refuses the file): {unhashed}"


def test_every_declared_dependency_is_pinned_in_the_lock():
    pins = lock_pins()
    missing = sorted(str(r) for r in declared() if canonicalize_name(r.name) not in pins)
    assert not missing, f"declared in pyproject.toml but not in requirements.lock (run `make lock`): {missing}"


def test_every_pin_satisfies_pyproject():
    pins = lock_pins()
    outside = [f"{r.name}=={pins[canonicalize_name(r.name)]} (pyproject: {r})" for r in declared()
               if canonicalize_name(r.name) in pins
               and not r.specifier.contains(pins[canonicalize_name(r.name)], prereleases=True)]
    assert not outside, f"requirements.lock pins outside pyproject.toml's ranges (run `make lock`): {outside}"


def test_the_local_wheels_stay_pinned_exactly():
    """torch and torchvision install from this machine's local files; a range would let a resolver
    pick a release that is only on the index (gigabytes of CUDA wheels)."""
    exact = {canonicalize_name(r.name): str(r.specifier) for r in declared() if r.name in ("torch", "torchvision")}
    assert exact == {"torch": "==2.14.1", "torchvision": "==0.29.1"}
    assert {k: lock_pins()[k] for k in exact} == {"torch": "2.14.1", "torchvision": "0.29.1"}


def test_make_install_installs_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("$(VENV)/.installed:", 1)[1].split("\n\n", 1)[0]
    assert "--require-hashes -r $(LOCK)" in recipe and "LOCK := requirements.lock" in makefile
    assert "--no-deps" in recipe, "the project itself must install without re-resolving its dependencies"
    assert "\nlock:" in makefile


# ---------------------------------------------------------------------------- venv vs lock


@pytest.mark.parametrize("name", sorted(declared_names()))
def test_installed_direct_dependency_matches_the_lock(name):
    pinned = lock_pins().get(name)
    assert pinned is not None, f"{name} is not in requirements.lock (run `make lock`)"
    installed = installed_version(name)
    assert installed is not None, f"{name} is not installed (run `make install`)"
    # PEP 440 `==`: a local label (2.14.1+cpu) still matches its public version.
    assert SpecifierSet(f"=={pinned}").contains(installed, prereleases=True), (
        f"{name} {installed} is installed, requirements.lock pins {pinned} (run `make install`)")


# ---------------------------------------------------------------------------- imports vs pyproject


def third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> the files importing it (lazy imports inside functions included)."""
    found: dict[str, set[str]] = {}
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_the_scan_sees_the_known_imports():
    assert {"torch", "prefect", "lightning", "timm", "cv2", "PIL", "yaml", "sklearn"} <= set(third_party_imports())


def test_every_third_party_import_is_declared():
    distributions = md.packages_distributions()
    declared_now = declared_names()
    undeclared = {}
    for module, files in sorted(third_party_imports().items()):
        providers = {canonicalize_name(d) for d in distributions.get(module, [])}
        if not providers & declared_now:
            undeclared[module] = (sorted(providers) or ["not installed"], sorted(files))
    assert not undeclared, (
        "imported but not declared in pyproject.toml (module: (installed distributions, files)); add the "
        f"distribution to [project] dependencies, then `make lock`: {undeclared}")
