"""Lower layers never import higher ones, also not inside a function (docs/architecture.md).

Read from the source (every `import`, wherever it sits), so a lazy import that would only
fail at run time, or quietly tie a low layer to a high one, fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "toolkit" / "ftkit"

# package -> the ftkit packages it must never import
FORBIDDEN = {
    "files": {"recipe", "plan", "images", "compose", "lease", "gpu", "run", "observe", "engines", "cli", "gateways", "prepare"},
    "procs": {"recipe", "plan", "images", "compose", "lease", "gpu", "run", "observe", "engines", "cli", "gateways", "prepare"},
    "text": {"recipe", "plan", "images", "compose", "lease", "gpu", "run", "observe", "engines", "cli", "gateways", "files", "procs", "errors", "prepare"},
    "dockerhost": {"recipe", "plan", "images", "compose", "lease", "gpu", "run", "observe", "engines", "cli", "gateways", "prepare"},
    "errors": {"recipe", "plan", "images", "compose", "lease", "gpu", "run", "observe", "engines", "cli", "gateways", "prepare"},
    "gateways": {"recipe", "plan", "images", "compose", "lease", "gpu", "run", "observe", "engines", "cli", "prepare"},
    "recipe": {"plan", "images", "compose", "lease", "gpu", "run", "observe", "engines", "cli", "prepare"},
    "gpu": {"images", "compose", "lease", "run", "observe", "engines", "cli", "prepare"},
    "lease": {"images", "compose", "run", "observe", "engines", "cli", "prepare"},
    "plan": {"images", "compose", "lease", "gpu", "run", "observe", "engines", "cli", "prepare"},
    "images": {"compose", "lease", "run", "observe", "engines", "cli", "prepare"},
    "compose": {"run", "observe", "engines", "cli", "prepare"},
    "prepare": {"compose", "run", "observe", "engines", "cli"},  # load -> resolve -> plan, with the host's facts
    "run": {"compose", "observe", "engines", "cli"},  # the runner imports no engine
    "strict": {"recipe", "plan", "images", "compose", "lease", "gpu", "run", "observe", "engines", "cli", "gateways",
               "prepare"},
    "engines": {"images", "compose", "lease", "run", "observe", "cli", "prepare"},
    "observe": {"cli"},
}


def _package(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _ftkit_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.add("<relative import: write it absolute, so this test can see it>")
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "ftkit"]
        for name in names:
            parts = name.split(".")
            if parts[0] == "ftkit" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_no_higher_layer(package: str) -> None:
    files = [p for p in PKG.rglob("*.py") if _package(p) == package]
    assert files, package
    bad = {f"{p.relative_to(PKG)} imports ftkit.{m}" for p in files
           for m in _ftkit_imports(p) if m in FORBIDDEN[package] or m.startswith("<")}
    assert not bad, sorted(bad)


# what sits above every layer: the commands and the package's own entry points
TOP = {"cli", "__init__", "__main__"}


def test_every_top_level_module_has_a_layer() -> None:
    """A module or package added (or moved) to the top of ftkit must get its row above, or
    this test could not hold it to its layer."""
    names = {p.name.removesuffix(".py") for p in PKG.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert names - TOP - set(FORBIDDEN) == set()
