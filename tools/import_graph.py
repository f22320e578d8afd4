"""graphopt's import graph against its layers: cycles, upward imports, and a picture of it.

Layers, lowest first; a module may import only from its own layer or a lower one:

0. core: the package itself, errors, the typed manifest, the model directory and what it writes
   beside the manifest (interop), IR load/save, the ONNX header reader, quantization ranges, the
   CPU kernels' block defaults;
1. passes and models: graph passes (``graphopt.passes``), family adapters (``graphopt.models``);
2. runtime: ``graphopt.runtime`` (imports no torch or transformers, checked too);
3. steps: the step protocol, the steps and what they need (evaluation, calibration, checkpoints);
4. pipelines and serving: recipes, optimize, drafting, the HTTP server and Ray Serve;
5. CLI: ``cli``, ``__main__`` and ``commands/``.

Every import counts, those inside functions too (the lazy ones keep start-up fast, but they are
dependencies all the same). A module that no layer names stops the check, so that nothing is left
out silently.

Usage: ``python tools/import_graph.py [--png docs/imports.png]``; exit status 1 when a cycle or an
upward import exists. ``tests/test_layering.py`` runs the same check.
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys
from collections.abc import Iterable

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Source folder -> the importable package it is installed as (pyproject.toml maps passes/ and models/).
PACKAGES = {"graphopt": "graphopt", "passes": "graphopt.passes", "models": "graphopt.models"}
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("graphopt", "graphopt.errors", "graphopt.manifest", "graphopt.modeldir", "graphopt.interop",
              "graphopt.ir", "graphopt.onnx_header", "graphopt.ranges", "graphopt.cpu_kernels")),
    ("passes, models", ("graphopt.passes*", "graphopt.models*")),
    ("runtime", ("graphopt.runtime*",)),
    ("steps", ("graphopt.steps", "graphopt.fusion", "graphopt.quantization", "graphopt.pruning", "graphopt.convert",
               "graphopt.gguf_import", "graphopt.vocabulary", "graphopt.export", "graphopt.distill", "graphopt.student",
               "graphopt.evaluate", "graphopt.calibration", "graphopt.capture", "graphopt.checkpoint",
               "graphopt.sources", "graphopt.importance", "graphopt.testing")),
    ("pipelines, serving", ("graphopt.recipes", "graphopt.optimize", "graphopt.drafting", "graphopt.server",
                            "graphopt.ray_serve")),
    ("CLI", ("graphopt.cli", "graphopt.__main__", "graphopt.commands*")),
]
RUNTIME_FORBIDDEN = ("torch", "transformers")


def modules(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
    """Every module of the installed package, by its import name."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = [part for part in path.relative_to(root / folder).with_suffix("").parts if part != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def _imported(tree: ast.AST, known: Iterable[str]) -> tuple[set[str], set[str]]:
    """(graphopt modules, other top-level packages) that ``tree`` imports anywhere."""
    known = set(known)
    inside, outside = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            if name in known:
                inside.add(name)
            elif not name.startswith("graphopt"):
                outside.add(name.split(".")[0])
    return inside, outside


def graph(root: pathlib.Path = ROOT) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(graphopt imports of each module, third-party packages of each module)."""
    found = modules(root)
    edges, external = {}, {}
    for name, path in found.items():
        inside, outside = _imported(ast.parse(path.read_text(encoding="utf-8")), found)
        edges[name], external[name] = inside - {name}, outside
    return edges, external


def layer_of(module: str) -> int:
    for index, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if module == pattern or (pattern.endswith("*") and (module == pattern[:-1] or
                                                                module.startswith(pattern[:-1] + "."))):
                return index
    raise KeyError(module)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or through others (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(edges.get(module, ())):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1 or module in edges.get(module, ()):
                found.append(sorted(group))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return found


def problems(edges: dict[str, set[str]], external: dict[str, set[str]]) -> list[str]:
    """One line per unclassified module, upward import, cycle, or runtime import of torch/transformers."""
    lines = []
    unclassified = []
    for module in sorted(edges):
        try:
            layer_of(module)
        except KeyError:
            unclassified.append(module)
    lines += [f"{module}: in no layer (add it to LAYERS in tools/import_graph.py)" for module in unclassified]
    for module in sorted(set(edges) - set(unclassified)):
        for target in sorted(edges[module] - set(unclassified)):
            if layer_of(target) > layer_of(module):
                lines.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                             f"({LAYERS[layer_of(target)][0]}), a higher layer")
        if module.startswith("graphopt.runtime"):
            lines += [f"{module} imports {package}" for package in sorted(external[module] & set(RUNTIME_FORBIDDEN))]
    lines += [f"import cycle: {' <-> '.join(group)}" for group in cycles(edges)]
    return lines


def plot(edges: dict[str, set[str]], path: pathlib.Path) -> None:
    """One row per layer (lowest at the bottom), one box per module, a line per import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: dict[int, list[str]] = {}
    for module in sorted(edges):
        rows.setdefault(layer_of(module), []).append(module)
    width = max(len(members) for members in rows.values())
    figure, axes = plt.subplots(figsize=(max(14, width * 0.95), 2.2 * len(LAYERS)))
    places = {}
    for layer, members in rows.items():
        for position, module in enumerate(members):
            places[module] = ((position + 0.5) * width / len(members), layer * 2.0)
    colours = plt.get_cmap("tab10")
    for module, targets in edges.items():
        x, y = places[module]
        for target in targets:
            tx, ty = places[target]
            colour = colours(layer_of(module)) if ty < y else "0.75"
            axes.plot([x, tx], [y, ty], color=colour, alpha=0.25 if ty < y else 0.6, linewidth=0.6, zorder=1)
    for module, (x, y) in places.items():
        short = module.removeprefix("graphopt.") if module != "graphopt" else "graphopt"
        axes.text(x, y, short.replace(".", ".\n", 1), ha="center", va="center", fontsize=6.5, zorder=2,
                  rotation=90 if len(rows[layer_of(module)]) > 20 else 0,
                  bbox=dict(boxstyle="round,pad=0.2", facecolor=colours(layer_of(module)), alpha=0.25, linewidth=0))
    for layer, (name, _) in enumerate(LAYERS):
        axes.text(-0.6, layer * 2.0, f"{layer}. {name}", ha="right", va="center", fontsize=10, fontweight="bold")
    count = sum(len(targets) for targets in edges.values())
    axes.set_title(f"graphopt's imports: {len(edges)} modules, {count} imports (functions' imports included); "
                   "each line runs down to a lower layer or stays within one (grey)", fontsize=10)
    axes.set_xlim(-4.5, width + 0.5)
    axes.set_ylim(-1.2, 2.0 * len(LAYERS) - 0.6)
    axes.axis("off")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--png", type=pathlib.Path, help="write the picture here (e.g. docs/imports.png)")
    args = parser.parse_args()
    edges, external = graph()
    found = problems(edges, external)
    for layer, (name, _) in enumerate(LAYERS):
        members = [module for module in edges if layer_of(module) == layer] if not found else []
        if members:
            print(f"{layer}. {name}: {len(members)} modules")
    print(f"{len(edges)} modules, {sum(len(targets) for targets in edges.values())} imports")
    for line in found:
        print(f"error: {line}", file=sys.stderr)
    if args.png and not found:
        plot(edges, args.png)
        print(f"wrote {args.png}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
