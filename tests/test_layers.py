"""Layers point one way: runtime <- reference_model <- exporter. Checked on the import graph of every .py.

Every import counts, including those inside functions (lazy ones) and importlib.import_module /
__import__ calls with a literal name: a lazy upward import breaks a torch-free install as surely
as a top-level one, only later.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPORT_EXTRA = {"torch", "onnx", "onnxscript", "safetensors", "transformers"}  # sentencepiece: base
# package -> top-level modules it must never import
FORBIDDEN = {
    "runtime": EXPORT_EXTRA | {"reference_model", "exporter"},
    "reference_model": {"exporter"},
}
# Modules the base install's commands (inspect, caption, classify, embed, verify --checksums,
# engine --emit-trtexec) run: torch-free too, although they live in exporter/. The CLI itself only
# at module level: its export commands import what they need inside, and say which extra is missing.
BASE_COMMAND_MODULES = ["exporter/tensorrt/engines.py", "exporter/tensorrt/profiles.py",
                        "exporter/inspect_bundle.py", "exporter/bench/load.py"]


def imported_modules(source: str, module: str, is_package: bool = False,
                     top_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in `source`, which is the module `module`.

    Names under the `bridge_export.` namespace are reported without that prefix (`runtime.text`), so a
    layer is the first part of the name either way.
    """
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found = []
    nodes = [n for stmt in tree.body if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
             for n in ast.walk(stmt)] if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.append((node.lineno, _strip(name)))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if fname in ("import_module", "__import__"):
                found.append((node.lineno, _strip(node.args[0].value)))
    return [(line, _strip(name)) for line, name in found]


def _strip(name: str) -> str:
    return name[len("bridge_export."):] if name.startswith("bridge_export.") else name


def violations(path: Path, forbidden: set[str], top_level_only: bool = False) -> list[str]:
    """`path:line imports name` for each import of a forbidden top-level module."""
    rel = path.relative_to(REPO)
    module = "bridge_export." + ".".join(rel.with_suffix("").parts)
    is_package = path.name == "__init__.py"
    if is_package:
        module = module.rpartition(".")[0]
    return [f"{rel}:{line} imports {name}"
            for line, name in imported_modules(path.read_text(), module, is_package, top_level_only)
            if name.split(".")[0] in forbidden]


def _files(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_one_way(package):
    files = _files(package)
    assert files, f"no .py files under {package}/"
    bad = [v for f in files for v in violations(f, FORBIDDEN[package])]
    assert bad == [], "\n".join(bad)


def test_base_commands_need_no_export_extra():
    bad = [v for f in BASE_COMMAND_MODULES for v in violations(REPO / f, EXPORT_EXTRA | {"reference_model"})]
    cli = sorted((REPO / "exporter" / "cli").glob("*.py"))
    assert cli, "exporter/cli/ has no modules"
    bad += [v for f in cli for v in violations(f, EXPORT_EXTRA | {"reference_model"}, top_level_only=True)]
    assert bad == [], "\n".join(bad)


def test_the_checker_sees_lazy_relative_and_dynamic_imports():
    src = ("import numpy\n"
           "def f():\n"
           "    import torch.nn\n"
           "    from ..exporter import bench\n"
           "    from . import pipeline\n"
           "    importlib.import_module('bridge_export.reference_model.model')\n")
    names = [n for _, n in imported_modules(src, "runtime.thing")]
    assert sorted(names) == sorted(["numpy", "torch.nn", "exporter", "runtime", "reference_model.model"])
    assert [n for _, n in imported_modules(src, "runtime.thing", top_level_only=True)] == ["numpy"]
    tops = {n.split(".")[0] for n in names}
    assert FORBIDDEN["runtime"] & tops == {"torch", "exporter", "reference_model"}
