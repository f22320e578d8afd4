"""``python -m graphopt``: the same CLI as the ``graphopt`` command."""

from __future__ import annotations

from graphopt.cli import main

if __name__ == "__main__":
    main(prog_name="graphopt")
