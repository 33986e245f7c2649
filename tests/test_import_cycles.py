"""No import cycles between the package's modules, counting every import (lazy ones inside functions too).

A lazy import that closes a circle only hides it: the two modules cannot be understood, tested or
moved apart. The graph is read from the source (tests/test_layers.py's parser), not by importing.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from test_layers import REPO, imported_modules  # noqa: E402

PACKAGES = ("runtime", "exporter", "reference_model")
# Circles allowed to remain: none.
REMAINING: list[set[str]] = []


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for top in PACKAGES:
        for p in (REPO / top).rglob("*.py"):
            parts = list(p.relative_to(REPO).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            mods[".".join(parts[:-1] if is_package else parts)] = (p, is_package)
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (a name's longest prefix that is a module)."""
    mods = _modules()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for m, (path, is_package) in mods.items():
        deps = {owner(name) for _, name in imported_modules(path.read_text(), "bridge_export." + m, is_package)}
        graph[m] = {d for d in deps if d and d != m}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.add(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(comp)
    return found


def test_the_finder_sees_a_circle_through_a_lazy_import():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = cycles(import_graph())
    unexpected = [sorted(c) for c in found if c not in REMAINING]
    assert unexpected == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in unexpected)


def test_the_split_circles_stay_split():
    """sessions / gpu sessions, the reference model / loading / checkpoint reader, bundle / stream export, fp8 /
    precision, the fused decoder / the graph writers and the stream exporter."""
    found = cycles(import_graph())
    pairs = [("runtime.sessions", "runtime.gpu.ort_session"), ("runtime.sessions", "runtime.gpu.trt_session"),
             ("reference_model.model", "reference_model.loading"),
             ("reference_model.checkpoint_reader", "reference_model.model"),
             ("exporter.export.bundle", "exporter.export.stream_export"),
             ("exporter.quantize.fp8", "exporter.quantize.precision"),
             ("exporter.export.fused_decoder", "exporter.export.internvl_graphs"),
             ("exporter.export.fused_decoder", "exporter.export.stream_export"),
             ("exporter.export.specs", "exporter.export.fused_decoder")]
    assert [p for p in pairs for c in found if set(p) <= c] == []
