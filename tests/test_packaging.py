"""Package hygiene: every import declared, the pins hold what the code relies on, the project stands alone."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCAL = {"dtsync"} | {p.stem for d in ("tests", "benchmarks") for p in (ROOT / d).glob("*.py")}  # sibling helpers


def declared(*extras: str) -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"][extra]]
    return {_canonical(r.name): r for r in reqs}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def third_party_imports(*folders: str) -> dict[str, set[str]]:
    """Top-level module -> files importing it, for every import (top level or inside a function)."""
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in LOCAL:
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def distributions(module: str) -> set[str]:
    return {_canonical(d) for d in metadata.packages_distributions().get(module, [])}


@pytest.mark.parametrize(("folders", "extras"), [(("dtsync",), ("plot", "gym")),
                                                 (("tests", "benchmarks", "deploy"), ("test", "bench"))])  # fmt: skip
def test_every_imported_distribution_is_declared(folders: tuple[str, ...], extras: tuple[str, ...]) -> None:
    names = declared(*extras)
    imports = third_party_imports(*folders)
    # A module no installed distribution provides (an optional extra not installed here, e.g. river) is known by
    # its own name.
    missing = {m: sorted(files) for m, files in imports.items()
               if not (distributions(m) or {_canonical(m)}) & names.keys()}  # fmt: skip
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_nothing_declared_goes_unused_by_the_package() -> None:
    used = set().union(*(distributions(m) for m in third_party_imports("dtsync")))
    unused = set(declared()) - used
    assert not unused, f"declared but never imported under dtsync/: {unused}"  # e.g. a progress library dropped


def test_installed_versions_satisfy_the_pins() -> None:
    for name, req in declared("plot", "gym", "test").items():
        assert req.specifier.contains(metadata.version(name), prereleases=True), (name, metadata.version(name), req)


def test_the_private_names_the_pins_stand_for_are_still_there() -> None:
    # Pinned in pyproject.toml because dtsync/daemon uses them; an upgrade that removes one fails here first.
    import asyncio

    import aiomqtt

    async def paho_client() -> object:
        return aiomqtt.Client("127.0.0.1")._client  # built, never connected

    assert callable(getattr(aiomqtt.Client, "_on_publish", None))
    assert callable(getattr(asyncio.run(paho_client()), "publish", None))


def test_license_is_an_spdx_expression() -> None:
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert metadata.metadata("dtsync")["License-Expression"] == "Apache-2.0"


def test_the_project_points_nowhere_outside_itself() -> None:
    offending = []
    skip = {".venv", ".git", "dtsync.egg-info", ".pytest_cache"}
    for path in ROOT.rglob("*"):
        text_file = path.suffix in {".py", ".md", ".toml", ".yaml", ".yml", ".cfg", ".service"}
        if not text_file or not path.is_file() or path == Path(__file__) or skip & set(path.relative_to(ROOT).parts):
            continue
        if re.search(r"\.\./shared|/work/shared", path.read_text(errors="replace")):
            offending.append(str(path.relative_to(ROOT)))
    assert not offending, offending
