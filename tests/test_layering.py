"""The import graph keeps its layers (tools/import_graph.py): no cycles, no upward imports, no torch in the runtime."""

from __future__ import annotations


def test_the_package_keeps_its_layers(load_tool):
    import_graph = load_tool("import_graph")
    edges, external = import_graph.graph()
    assert import_graph.problems(edges, external) == []
    assert len(edges) > 80  # the whole package was read (graphopt/, passes/, models/)


def test_the_check_reports_each_kind_of_problem(load_tool):
    import_graph = load_tool("import_graph")
    edges = {"graphopt.errors": {"graphopt.cli"},  # core importing the CLI: upward, and a cycle with the next
             "graphopt.cli": {"graphopt.errors"},
             "graphopt.runtime.session": set(),
             "graphopt.newthing": set()}
    external = {name: set() for name in edges}
    external["graphopt.runtime.session"] = {"torch", "numpy"}
    found = import_graph.problems(edges, external)
    assert "graphopt.newthing: in no layer (add it to LAYERS in tools/import_graph.py)" in found
    assert "graphopt.errors (core) imports graphopt.cli (CLI), a higher layer" in found
    assert "graphopt.runtime.session imports torch" in found
    assert "import cycle: graphopt.cli <-> graphopt.errors" in found
    assert len(found) == 4


def test_imports_inside_functions_count(load_tool, tmp_path):
    import_graph = load_tool("import_graph")
    for folder in ("graphopt", "passes", "models"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "graphopt" / "errors.py").write_text("def f():\n    from graphopt import cli\n    import torch\n")
    (tmp_path / "graphopt" / "cli.py").write_text("from graphopt.errors import f\n")
    edges, external = import_graph.graph(tmp_path)
    # `from graphopt import cli` runs the package's __init__ too: both are dependencies.
    assert edges["graphopt.errors"] == {"graphopt", "graphopt.cli"} and edges["graphopt.cli"] == {"graphopt.errors"}
    assert external["graphopt.errors"] == {"torch"}
    assert import_graph.cycles(edges) == [["graphopt.cli", "graphopt.errors"]]
