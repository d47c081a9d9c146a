"""The package's shape: no import cycles, and every import points down the layers (ARCHITECTURE.md).

Walks every module's imports with `ast`, function-level ones included (an import inside a function is still a
dependency), so a new upward import or cycle fails here, not in a newcomer's head. An import inside a function
only puts off torch, ONNX, TensorRT or an optional extra; every other one is at the top of its module.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import patchcore_edge

PACKAGE = Path(patchcore_edge.__file__).parent
ROOT = "patchcore_edge"

# Lower number = lower layer. A module may import its own subpackage, or any module of a lower layer.
LAYERS: Dict[str, int] = {
    # the package itself: the public facade (`from patchcore_edge import Detector`), names imported lazily
    "": 6,
    # core: data, image I/O, the input transform, search, score math, maps, decision rules, statistics
    "bundle": 0, "imageio": 0, "preprocess": 0, "search": 0, "scoring": 0, "maps": 0, "decision": 0,
    "stats": 0, "progress": 0, "errors": 0, "cpu": 0,
    # methods (runtime halves) and the TensorRT layer
    "methods": 1, "trt": 1,
    # the boards: profiles, detection, memory fit, the engines for this board (build, verify, register, find);
    # below the runtime (which picks the board's engine) and export (which builds one)
    "devices": 2,
    # the runtime: backends, detector, sources, outputs
    "runtime": 3,
    # the users' jobs
    "export": 4, "calibration": 4, "evaluation": 4, "fleet": 4,
    # the command line over all of them
    "cli": 5,
}
CORE = 0
# Imports that break the rule today, each with the reason; the list only ever shrinks.
KNOWN_EXCEPTIONS: Set[Tuple[str, str]] = set()
# Modules that still read manifest keys (none since the trt/ split handed them the Bundle).
MANIFEST_READERS_PENDING: Set[str] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([ROOT] + parts)


def _import_targets(path: Path, name: str) -> List[Tuple[str, bool]]:
    """(module, imported inside a function) for every import the module runs, third-party ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: List[Tuple[str, bool]] = []
    for node, in_function in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, in_function) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != ROOT:
                found.append((target, in_function))
                continue
            # `from . import x` may name a submodule: count it as one when it is.
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.append((candidate if _exists(candidate) else target, in_function))
    return found


def _imports(path: Path, name: str) -> List[str]:
    return [target for target, _ in _import_targets(path, name) if target.split(".")[0] == ROOT]


def _runtime_nodes(tree: ast.AST) -> List[Tuple[ast.AST, bool]]:
    """Every node but those under `if TYPE_CHECKING:` (annotations only, never executed), with whether it runs
    inside a function."""
    nodes: List[Tuple[ast.AST, bool]] = []
    pending: List[Tuple[ast.AST, bool]] = [(tree, False)]
    while pending:
        node, in_function = pending.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            pending.extend((child, in_function) for child in node.orelse)
            continue
        nodes.append((node, in_function))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        pending.extend((child, inner) for child in ast.iter_child_nodes(node))
    return nodes


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def _graph() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        graph[name] = {target for target in _imports(path, name) if target != name}
    return graph


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_has_a_layer() -> None:
    missing = sorted({_top(m) for m in _graph()} - set(LAYERS))
    assert not missing, f"add these to LAYERS (and ARCHITECTURE.md): {missing}"


def test_imports_only_point_down() -> None:
    upward = []
    for module, targets in _graph().items():
        for target in targets:
            source, dest = _top(module), _top(target)
            if source == dest or (module, target) in KNOWN_EXCEPTIONS:
                continue
            if target == ROOT:
                continue  # the package's own __init__ holds only __version__ and the lazy names
            if LAYERS[source] == CORE and LAYERS[dest] == CORE:
                continue  # core modules use each other; the cycle test keeps them in an order
            if LAYERS.get(dest, 99) >= LAYERS.get(source, -1):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that point up or sideways:\n" + "\n".join(sorted(upward))


def test_no_import_cycles() -> None:
    graph = _graph()
    state: Dict[str, int] = {}
    stack: List[str] = []
    cycles: List[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in graph or target == ROOT or (node, target) in KNOWN_EXCEPTIONS:
                continue
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


# Third-party packages an import inside a function may put off: torch (the runtime never loads it), ONNX,
# TensorRT / CUDA, and the optional extras that are not installed everywhere. Everything else is imported at
# the top of its module, where a reader sees the module's dependencies.
DEFERRABLE = {"torch", "torchvision", "onnx", "onnxruntime", "tensorrt", "cuda", "efficientnet_lite_pytorch",
              "dask", "distributed", "paho", "threadpoolctl"}


def test_imports_inside_functions_only_put_off_heavy_or_optional_packages() -> None:
    targets = {_module_name(path): _import_targets(path, _module_name(path))
               for path in PACKAGE.rglob("*.py")}

    def package_chain(module: str) -> List[str]:  # importing a.b.c runs a, a.b and a.b.c
        parts = module.split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]

    # Our modules that load a deferrable package when imported, themselves or through another of ours.
    heavy: Set[str] = set()
    grew = True
    while grew:
        grew = False
        for module, found in targets.items():
            if module not in heavy and any(
                    not inside and (target.split(".")[0] in DEFERRABLE or heavy & set(package_chain(target)))
                    for target, inside in found):
                heavy.add(module)
                grew = True
    offenders = sorted({f"{module} imports {target} inside a function" for module, found in targets.items()
                       for target, inside in found
                       if inside and target.split(".")[0] not in DEFERRABLE
                       and not heavy & set(package_chain(target))})
    assert not offenders, "import these at the top of the module:\n" + "\n".join(offenders)


def test_only_the_bundle_module_reads_manifest_keys() -> None:
    """Outside bundle.py nothing indexes a manifest: the Bundle is the one place that knows its keys."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent == PACKAGE and path.name in {"bundle.py"} | MANIFEST_READERS_PENDING:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            code = line.split("#", 1)[0]
            if "manifest[" in code or "manifest.get(" in code:
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
