"""Size of graphopt's orchestration layer now against a baseline commit (the measure of issue 13).

The orchestration layer is every ``graphopt/*.py`` and ``graphopt/commands/*.py`` module that
existed at the baseline (before the step-protocol redesign), plus the modules that redesign split
out of them (``steps.py``, ``manifest.py``). Not counted: ``graphopt/runtime/`` (its own layer), and
the modules of features added since the baseline, which have no counterpart in it. Any other new
module under ``graphopt/`` makes the script stop, so that nothing is left out silently.

Columns: ``lines`` is ``wc -l``; ``code`` counts lines that are neither blank nor only a comment
(docstrings count as code).

Usage: ``python tools/code_size.py [--base 1996e84] [--rev WORKTREE]``
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

BASELINE = "1996e84"
# Split out of the baseline's modules by the redesign (graphopt.json handling, the step runner).
SUCCESSORS = {"graphopt/steps.py", "graphopt/manifest.py"}
# Features added since the baseline: no counterpart in it, so not part of the comparison.
NEW_FEATURES = {
    "graphopt/distill.py", "graphopt/student.py", "graphopt/server.py", "graphopt/ray_serve.py",
    "graphopt/interop.py", "graphopt/gguf_import.py", "graphopt/cpu_kernels.py",
    "graphopt/commands/distill.py", "graphopt/commands/serve.py", "graphopt/vocabulary.py",
    "graphopt/commands/vocabulary.py",
    # Reads an ONNX file's header without the onnx package (start-up time); check_graph calls it.
    "graphopt/onnx_header.py",
}


def _git(repo: pathlib.Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def _modules(repo: pathlib.Path, rev: str | None) -> set[str]:
    if rev is None:
        names = [str(path.relative_to(repo)) for path in (repo / "graphopt").rglob("*.py")]
    else:
        names = _git(repo, "ls-tree", "-r", "--name-only", rev, "graphopt").split()
    return {name for name in names if name.endswith(".py") and not name.startswith("graphopt/runtime/")}


def _text(repo: pathlib.Path, rev: str | None, name: str) -> str:
    if rev is None:
        path = repo / name
        return path.read_text() if path.exists() else ""
    return _git(repo, "show", f"{rev}:{name}")


def _size(text: str) -> tuple[int, int]:
    lines = text.splitlines()
    code = [line for line in lines if line.strip() and not line.strip().startswith("#")]
    return len(lines), len(code)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=BASELINE, help="baseline commit (default: %(default)s)")
    parser.add_argument("--rev", default=None, help="commit to measure (default: the working tree)")
    parser.add_argument("--repo", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parents[1])
    args = parser.parse_args()

    before = _modules(args.repo, args.base)
    now = _modules(args.repo, args.rev)
    unknown = sorted(now - before - SUCCESSORS - NEW_FEATURES)
    if unknown:
        print(f"error: unclassified new modules: {', '.join(unknown)} (add them to SUCCESSORS or NEW_FEATURES)",
              file=sys.stderr)
        return 2
    counted = sorted(before | (now & SUCCESSORS))
    print(f"{'module':34} {'lines':>6} {'':>6} {'code':>6} {'':>6}")
    print(f"{'':34} {'before':>6} {'now':>6} {'before':>6} {'now':>6}")
    totals = [0, 0, 0, 0]
    for name in counted:
        lines_before, code_before = _size(_text(args.repo, args.base, name)) if name in before else (0, 0)
        lines_now, code_now = _size(_text(args.repo, args.rev, name)) if name in now else (0, 0)
        row = (lines_before, lines_now, code_before, code_now)
        totals = [total + value for total, value in zip(totals, row)]
        print(f"{name:34} {row[0]:6d} {row[1]:6d} {row[2]:6d} {row[3]:6d}")
    print(f"{'total':34} {totals[0]:6d} {totals[1]:6d} {totals[2]:6d} {totals[3]:6d}")
    print(f"change: lines {totals[1] - totals[0]:+d} ({100 * (totals[1] / totals[0] - 1):+.1f}%), "
          f"code {totals[3] - totals[2]:+d} ({100 * (totals[3] / totals[2] - 1):+.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
