"""Dependency hygiene, offline: what the code imports is declared, and the locks
(requirements/*.txt, written by `make lock`) agree with pyproject.toml.

- every third-party module that relay/ and workers/ import is a declared runtime dependency;
- every declared dependency is pinned, within its range, on each Python the project supports;
- every pin is exact and hashed;
- the runtime lock (what the image installs) pins exactly what the dev lock (what the tests run
  on) pins.
A failure here after editing pyproject.toml means: run `make lock`.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.markers import Marker, default_environment
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_LOCK = ROOT / "requirements" / "runtime.txt"
DEV_LOCK = ROOT / "requirements" / "dev.txt"
FIRST_PARTY = ("relay", "workers")
# Modules of a distribution that a declared one pins exactly: declaring it as well adds nothing.
PINNED_BY = {"pydantic_core": "pydantic"}
# The interpreters the locks must serve (full versions, as markers compare them).
PYTHONS = ("3.11.0", "3.12.0", "3.13.0")


@dataclass(frozen=True)
class Pin:
    """One entry of a lock."""

    name: NormalizedName
    version: Version
    marker: Marker | None
    hashes: tuple[str, ...]

    def applies(self, python: str) -> bool:
        """Whether pip installs this entry on CPython `python` on Linux."""
        return self.marker is None or self.marker.evaluate(linux_cpython(python))


def linux_cpython(python: str) -> dict[str, str]:
    """The marker environment of CPython `python` on x86-64 Linux."""
    env: dict[str, str] = dict(default_environment())
    env.update(
        python_version=".".join(python.split(".")[:2]),
        python_full_version=python,
        implementation_name="cpython",
        platform_python_implementation="CPython",
        sys_platform="linux",
        platform_system="Linux",
        os_name="posix",
        platform_machine="x86_64",
    )
    return env


def parse_pin(line: str) -> Pin:
    """`name==1.0 ; marker --hash=sha256:... --hash=...` as a Pin."""
    spec, *hashes = line.split(" --hash=")
    requirement = Requirement(spec)
    (specifier,) = requirement.specifier
    assert specifier.operator == "==", f"not an exact pin: {spec}"
    return Pin(
        canonicalize_name(requirement.name),
        Version(specifier.version),
        requirement.marker,
        tuple(h.strip() for h in hashes),
    )


@cache
def lock(path: Path) -> tuple[Pin, ...]:
    """A lock's entries (continuation lines joined, comments left out)."""
    text = re.sub(r"\s*\\\n\s*", " ", path.read_text())
    lines = (line.split(" #", 1)[0].strip() for line in text.splitlines())
    return tuple(parse_pin(line) for line in lines if line and not line.startswith("#"))


@cache
def project() -> dict[str, list[str]]:
    """pyproject.toml's requirements: "runtime", and "dev" (runtime and the [dev] extra)."""
    metadata = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime: list[str] = metadata["dependencies"]
    return {"runtime": runtime, "dev": runtime + metadata["optional-dependencies"]["dev"]}


def third_party_imports() -> dict[str, Path]:
    """The top-level third-party modules relay/ and workers/ import, each with one importer."""
    found: dict[str, Path] = {}
    for package in FIRST_PARTY:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                for name in imported(node):
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                        found.setdefault(top, path)
    return found


def imported(node: ast.AST) -> list[str]:
    """The absolute module names an import statement names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module]
    return []


# --- what the code imports ---------------------------------------------------------------


def test_every_third_party_import_is_a_declared_runtime_dependency() -> None:
    declared = {canonicalize_name(Requirement(r).name) for r in project()["runtime"]}
    providers = packages_distributions()
    for module, importer in third_party_imports().items():
        names = [PINNED_BY[module]] if module in PINNED_BY else providers.get(module, [])
        distributions = {canonicalize_name(d) for d in names}
        assert distributions, f"{importer.relative_to(ROOT)}: {module} is not installed"
        assert distributions & declared, (
            f"{importer.relative_to(ROOT)} imports {module} ({', '.join(sorted(distributions))}),"
            " which pyproject.toml's dependencies do not declare"
        )


# --- the locks -----------------------------------------------------------------------------


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize(("path", "group"), [(RUNTIME_LOCK, "runtime"), (DEV_LOCK, "dev")])
def test_every_declared_dependency_is_pinned_within_its_range(
    path: Path, group: str, python: str
) -> None:
    for line in project()[group]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        versions = [p.version for p in lock(path) if p.name == name and p.applies(python)]
        assert versions, f"{path.name} pins no {name} for Python {python}: run `make lock`"
        for version in versions:
            assert requirement.specifier.contains(version, prereleases=True), (
                f"{path.name} pins {name}=={version}, outside {requirement}: run `make lock`"
            )


@pytest.mark.parametrize("path", [RUNTIME_LOCK, DEV_LOCK], ids=lambda p: p.name)
def test_every_pin_is_hashed(path: Path) -> None:
    pins = lock(path)
    assert pins
    for pin in pins:
        assert pin.hashes, f"{path.name}: {pin.name} has no hash"
        assert all(h.startswith("sha256:") for h in pin.hashes), pin.name


def test_the_runtime_lock_pins_what_the_dev_lock_pins() -> None:
    dev = {(pin.name, pin.version, str(pin.marker)) for pin in lock(DEV_LOCK)}
    for pin in lock(RUNTIME_LOCK):
        assert (pin.name, pin.version, str(pin.marker)) in dev, (
            f"{pin.name}=={pin.version} is in the runtime lock but not the dev lock's pin"
        )
