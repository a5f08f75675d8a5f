"""The package's layers (README, "Architecture"): lower layers never import higher ones, no module-level
import circles, and Ray is imported only where Ray work runs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "genstress_ray"
# Lowest first. A module may import its own layer and the ones below.
LAYERS = [
    ("foundation", ["registry", "faults", "storage", "lease", "progress", "cleanup", "data", "metrics"]),
    ("models", ["models"]),
    ("strategies", ["strategies", "regions", "counterfactuals"]),
    ("campaign config", ["config", "runs"]),
    ("run context", ["context"]),
    ("consumers", ["real_regions", "guardrails", "labeling", "repair", "assessment", "report"]),
    ("ray", ["stages", "pipeline", "correction", "jobs", "scan"]),
    ("command line", ["console", "label_commands", "job_commands", "cli", "__init__"]),
]
RAY_LAYER = "ray"


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for i, (_, members) in enumerate(LAYERS):
        if top in members:
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to the README's Architecture)")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found["genstress_ray.__init__" if name == "genstress_ray" else name] = path
    return found


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """genstress_ray modules imported by ``path`` (at module level only, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("genstress_ray"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("genstress_ray"))
    return out


@pytest.mark.parametrize("module", sorted(_modules()))
def test_a_module_imports_only_its_layer_and_those_below(module):
    mine = _layer(module)
    for imported in _imports(_modules()[module], top_level_only=False):
        if imported == "genstress_ray":
            continue
        assert _layer(imported) <= mine, (f"{module} ({LAYERS[mine][0]}) imports {imported} "
                                          f"({LAYERS[_layer(imported)][0]}), a higher layer")


def test_no_module_level_import_circles():
    modules = _modules()
    graph = {m: {i for i in _imports(p, top_level_only=True) if i in modules} for m, p in modules.items()}
    # A package's __init__ importing its own submodules is how packages are built, not a circle.
    graph = {m: {i for i in deps if i != m and not m.startswith(i + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            assert state.get(d) != 1, "import circle: " + " -> ".join(path + [m, d])
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def _imports_ray_at_module_level(path: Path) -> bool:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "ray" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ray":
            return True
    return False


def test_ray_is_imported_at_module_level_only_by_the_ray_layer():
    for module, path in _modules().items():
        if LAYERS[_layer(module)][0] != RAY_LAYER:
            assert not _imports_ray_at_module_level(path), f"{module} imports Ray at module level"


def test_loading_a_run_labelling_assessing_and_reporting_do_not_import_ray():
    code = ("import sys, genstress_ray.context, genstress_ray.assessment, genstress_ray.labeling, "
            "genstress_ray.report, genstress_ray.cli, genstress_ray.models, genstress_ray.strategies; "
            "genstress_ray.cli.build_parser(); print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
