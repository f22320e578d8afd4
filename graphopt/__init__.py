"""graphopt: shrink and speed up transformer language models at the ONNX graph level."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

__version__ = "0.1.0"


def _map_source_tree() -> None:
    """In a source checkout that was not pip-installed, expose ``passes/`` and ``models/`` as
    ``graphopt.passes`` and ``graphopt.models``, as the installed package does (pyproject's
    package-dir). Installed copies are found first and left alone."""
    root = pathlib.Path(__file__).resolve().parent.parent
    for name in ("passes", "models"):
        qualified = f"{__name__}.{name}"
        init = root / name / "__init__.py"
        if qualified in sys.modules or not init.is_file():
            continue
        try:
            if importlib.util.find_spec(qualified) is not None:
                continue
        except ImportError:
            pass
        spec = importlib.util.spec_from_file_location(qualified, init, submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[qualified] = module
        spec.loader.exec_module(module)


_map_source_tree()
