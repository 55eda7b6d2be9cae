"""docs/architecture.md's dependency rule, checked: every import of every module of `echelon`
(function-local ones included; `if TYPE_CHECKING:` blocks excluded, they never run) is walked
with `ast`, and an import that points the wrong way fails here with the module and line."""

from __future__ import annotations

import ast
from collections import defaultdict
from functools import cache
from pathlib import Path

import echelon

SRC = Path(echelon.__file__).parent
GENERATED = "echelon.v1"  # protoc's output: imports only protobuf and itself


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """(imported module, line) for every import executed at some point, resolved to absolute names.
    `from a import b` counts as importing `a.b` when that is a module, else `a`."""
    found: list[tuple[str, int]] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            for a in node.names:
                candidate = f"{base}.{a.name}"
                found.append((candidate if candidate in MODULES else base, node.lineno))
        stack.extend(ast.iter_child_nodes(node))
    return found


MODULES: dict[str, Path] = {
    module_name(p): p for p in SRC.rglob("*.py") if not module_name(p).startswith(GENERATED)
}


@cache
def graph() -> dict[str, list[tuple[str, int]]]:
    return {
        m: _imports(ast.parse(p.read_text()), m, p.name == "__init__.py") for m, p in sorted(MODULES.items())
    }


def under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# (who, what they must not import, why): `who` and `what` are module prefixes.
ML = ("transformers", "peft", "tokenizers", "safetensors", "datasets")
RUNTIMES = ("echelon.runtime", "echelon.runner", "echelon.assembly", "echelon.commands", "echelon.cli")
RULES: list[tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], str]] = [
    (
        ("echelon.planes", "echelon.secagg"),
        (),
        (*RUNTIMES, "echelon.train", "echelon.yellowstone", "grpc", *ML),
        "sans-IO planes and secure aggregation know no runtime, no trainer, no ML framework but torch",
    ),
    (
        ("echelon.tensors", "echelon.sansio", "echelon.wire", "echelon.contract", "echelon.parties"),
        (),
        ("echelon.planes", "echelon.secagg", *RUNTIMES, "echelon.train", "grpc", *ML),
        "the contract and the vocabulary below it know nothing of the planes or a runtime",
    ),
    (
        ("echelon.yellowstone",),
        (),
        ("echelon.planes", "echelon.secagg", "echelon.runtime", "echelon.runner", "echelon.assembly"),
        "Yellowstone compiles topologies; it never drives the planes",
    ),
    (
        ("echelon.train",),
        (),
        ("echelon.planes", "echelon.secagg", *RUNTIMES, "grpc"),
        "the trainer knows nothing of the planes or a runtime",
    ),
    (
        ("echelon.runtime.grpc",),
        (),
        ("echelon.runtime.sim", "echelon.runner"),
        "the deployment runs the planes without the simulator",
    ),
    (
        ("echelon.runtime.sim",),
        (),
        ("echelon.runtime.grpc", "grpc", "echelon.runner", "echelon.assembly"),
        "the simulator drives the planes; it assembles nothing and knows no deployment",
    ),
    (
        ("echelon.config", "echelon.strategies", "echelon.errors", "echelon.yamlio", "echelon.cliargs"),
        (),
        ("echelon.planes", "echelon.secagg", *RUNTIMES, "echelon.train", "torch", *ML),
        "run files are validated without a plane, a runtime or a model",
    ),
]


def wrong_way_imports() -> list[str]:
    problems = set()
    for module, imports in graph().items():
        for who, exempt, banned, why in RULES:
            if not under(module, *who) or under(module, *exempt):
                continue
            for target, line in imports:
                if under(target, *banned):
                    problems.add(f"{module}:{line} imports {target} ({why})")
    return sorted(problems)


# Units of the cycle check besides echelon's top-level packages: the runtimes apart, and the
# plan.json schema, the one file of Yellowstone that run files read (a leaf: errors, rundir, yamlio).
UNITS = ("echelon.runtime.sim", "echelon.runtime.grpc", "echelon.yellowstone.plan")


def package(module: str) -> str:
    """The unit `module` belongs to in the cycle check."""
    unit = next((u for u in UNITS if under(module, u)), None)
    return unit or ".".join(module.split(".")[:2])


def package_cycles() -> list[list[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for module, imports in graph().items():
        for target, _ in imports:
            if target.startswith("echelon.") and package(target) != package(module):
                edges[package(module)].add(package(target))
    # Tarjan's strongly connected components: any with more than one package is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def test_the_walker_sees_local_and_relative_imports():
    tree = ast.parse(
        "import a.b\nfrom . import c\nif TYPE_CHECKING:\n    import hidden\n"
        "def f():\n    from echelon.runner import train\n"
    )
    found = {name for name, _ in _imports(tree, "echelon.x.y", is_package=False)}
    assert found == {"a.b", "echelon.x", "echelon.runner"}


def test_no_wrong_way_imports():
    assert MODULES, "no module found"
    assert wrong_way_imports() == []


def test_no_package_cycles():
    assert package_cycles() == []
