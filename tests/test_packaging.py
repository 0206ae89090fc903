"""Each part's dependency group (pyproject.toml) holds exactly what its code imports, so each image runs.

Checked statically: every module of a part, and every first-party module it reaches through imports
(function-local imports included), may import only the standard library, first-party code and the
distributions of ``dependencies`` + the part's group.  Measured on the shared 2-core dev machine
(2026-11-29, pip cache warm): a fresh venv with ``tokenslice[sidecar]`` installed from the checkout
(wheel build included) and ``tokenslice sidecar --help`` run took 166 s wall -- about 8 minutes for the
three images -- so the suite checks the import closure (under a second) and the Dockerfiles' group.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest

from tokenslice.paths import REPO_ROOT

FIRST_PARTY_ROOTS = {"tokenslice": REPO_ROOT, "tokenslice_sidecar": REPO_ROOT / "sidecar",
                     "tokenslice_picker": REPO_ROOT / "gateway_ext", "tokenslice_operator": REPO_ROOT / "operator"}
NOT_IN_IMAGES = {
    # run by another interpreter (the vLLM engine venv that `tokenslice engine setup` builds), never by ours
    REPO_ROOT / "tokenslice" / "engine" / "build_model.py",
    # `tokenslice operator crds` rewrites files of a source checkout (crds/, the chart): a dev-only tool
    REPO_ROOT / "operator" / "tokenslice_operator" / "crdgen.py",
}
# imported only on an opt-in path whose docs say to install it first
OPT_IN = {"httpx": "tokenslice bench micro sidecar --clients httpx (`pip install httpx` first)"}
CORE_MODULES = ("__init__", "__main__", "cli", "contract", "errors", "inferencepool", "paths", "policy", "sse")
PARTS = {
    # part: (its files, the extras it installs)
    # the contracts every part imports; tokenslice/{envoy,procs,promtext,fairness,kubeapi}.py are shared helpers,
    # checked through the parts that import them
    "core": ([REPO_ROOT / "tokenslice" / f"{m}.py" for m in CORE_MODULES], []),
    "sidecar": (sorted((REPO_ROOT / "sidecar" / "tokenslice_sidecar").rglob("*.py")), ["sidecar"]),
    "picker": (sorted((REPO_ROOT / "gateway_ext" / "tokenslice_picker").rglob("*.py")), ["picker"]),
    "operator": (sorted((REPO_ROOT / "operator" / "tokenslice_operator").rglob("*.py")), ["operator"]),
    "local": (sorted([*(REPO_ROOT / "tokenslice" / "local").rglob("*.py"),
                      *(REPO_ROOT / "tokenslice" / "engine").rglob("*.py")]), ["local"]),
    "bench": (sorted((REPO_ROOT / "tokenslice" / "bench").rglob("*.py")), ["bench"]),
}


def _project() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def requirements(extras: list[str]) -> set[str]:
    """Distribution names installed by ``tokenslice[extras]`` (self-references expanded)."""
    project = _project()
    out = {_name(r) for r in project["dependencies"]}
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in project["optional-dependencies"][extra]:
            if _name(req) == "tokenslice":
                todo += re.search(r"\[(.*)\]", req).group(1).split(",")
            else:
                out.add(_name(req))
    return out


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside ``try: ... except ImportError`` (an optional import with a fallback)."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers):
            return True
    return False


@cache
def imports_of(path: Path) -> frozenset[str]:
    """Dotted module names a file imports (relative imports resolved), optional ones left out."""
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = _module_of(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_of(path)
    out = set()
    for node in ast.walk(tree):
        if _guarded(node, parents):
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return frozenset(out)


def _module_of(path: Path) -> str:
    for top, root in FIRST_PARTY_ROOTS.items():
        if path.is_relative_to(root / top):
            rel = path.relative_to(root).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            return ".".join(parts)
    raise ValueError(path)


def _file_of(module: str) -> Path | None:
    top = module.split(".")[0]
    if top not in FIRST_PARTY_ROOTS:
        return None
    base = FIRST_PARTY_ROOTS[top].joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None  # a name imported from a module, not a module


def third_party_closure(files: list[Path]) -> dict[str, Path]:
    """Top-level third-party module -> one first-party file that imports it, over the import closure."""
    found: dict[str, Path] = {}
    todo, seen = [f for f in files if f not in NOT_IN_IMAGES], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in imports_of(path):
            top = module.split(".")[0]
            if top in FIRST_PARTY_ROOTS:
                target = _file_of(module)
                if target and target not in NOT_IN_IMAGES:
                    todo.append(target)
                    parent = _file_of(module.rsplit(".", 1)[0]) if "." in module else None
                    if parent:
                        todo.append(parent)  # a package's __init__ runs too
            elif top and top != "__future__" and top not in sys.stdlib_module_names:
                found.setdefault(top, path)
    return found


@cache
def _installed() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distributions(module: str) -> set[str]:
    return {d.lower().replace("_", "-") for d in _installed().get(module, [])}


@pytest.mark.parametrize("part", sorted(PARTS))
def test_every_import_of_a_part_is_in_its_dependency_group(part: str) -> None:
    files, extras = PARTS[part]
    allowed = requirements(extras)
    missing = {module: str(path.relative_to(REPO_ROOT)) for module, path in third_party_closure(files).items()
               if not distributions(module) & allowed and module not in OPT_IN}
    assert not missing, f"{part}: imported but not in tokenslice[{','.join(extras)}]: {missing}"


def test_core_is_minimal_and_components_do_not_pull_each_others_dependencies() -> None:
    assert requirements([]) == {"pydantic", "pyyaml"}
    assert "kopf" not in requirements(["sidecar"]) | requirements(["picker"])
    assert "grpcio" not in requirements(["sidecar"]) | requirements(["operator"])


def test_the_check_sees_a_missing_dependency() -> None:
    """The closure reaches kopf from the operator, and grpc from the picker through its imports."""
    assert "kopf" in third_party_closure(PARTS["operator"][0])
    assert "grpc" in third_party_closure(PARTS["picker"][0])
    assert "kopf" not in requirements(["picker"])


def test_dockerfiles_install_their_group() -> None:
    for part in ("sidecar", "picker", "operator"):
        text = (REPO_ROOT / "docker" / f"{part}.Dockerfile").read_text()
        assert f'tokenslice-*.whl)[{part}]"' in text, f"docker/{part}.Dockerfile installs another group"

