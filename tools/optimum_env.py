"""Build the environment Hugging Face Optimum runs in, beside (not inside) graphopt's own.

optimum-onnx 0.1.0 requires transformers 4.57 while graphopt's environment has transformers 5.x,
so Optimum gets a venv of its own: torch (the pinned CPU build), optimum-onnx and onnxruntime, and
nothing of graphopt. ``tools/optimum_generate.py`` runs in it; ``tests/test_interop_optimum.py``
builds it once per run (or reuses ``$GRAPHOPT_OPTIMUM_PYTHON``).

Usage: python tools/optimum_env.py DIR  (prints DIR/bin/python; a no-op when it is already built)
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import venv

PACKAGES = ("torch==2.13.0", "optimum-onnx==0.1.0", "onnxruntime>=1.20")


def build(directory: str | pathlib.Path) -> pathlib.Path:
    """Create (once) the venv at ``directory`` and return its python."""
    directory = pathlib.Path(directory)
    python = directory / "bin" / "python"
    marker = directory / ".graphopt-optimum-ready"
    if marker.is_file():
        return python
    venv.EnvBuilder(with_pip=True, clear=True).create(directory)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PACKAGES], check=True)
    subprocess.run([str(python), "-c", "import optimum.onnxruntime"], check=True)
    marker.write_text(" ".join(PACKAGES) + "\n")
    return python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    print(build(parser.parse_args().directory))


if __name__ == "__main__":
    sys.exit(main())
