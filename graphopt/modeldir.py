"""The model directory: ``model.onnx`` (+ external data), tokenizer files and ``graphopt.json``.

Every command reads one model directory and writes a new one. Writes are atomic: the new
directory is built beside the target under a hidden name and renamed into place at the end, so an
interrupted or failed command leaves nothing half written. This module needs no torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Any, Iterator

from graphopt.errors import GraphoptError

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "graphopt.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "vocab.json", "merges.txt")


class ModelDir:
    """A graphopt model directory on disk."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ModelDir":
        """Open an existing model directory, with a clear error when it is not one."""
        directory = cls(path)
        if not directory.path.exists():
            raise GraphoptError(f"{directory.path}: no such directory")
        if not directory.path.is_dir():
            raise GraphoptError(f"{directory.path}: not a directory (expected a graphopt model directory)")
        for required in (MODEL_FILE, MANIFEST_FILE):
            if not (directory.path / required).is_file():
                raise GraphoptError(f"{directory.path}: not a graphopt model directory (no {required})")
        try:
            directory.manifest
        except (OSError, json.JSONDecodeError) as error:
            raise GraphoptError(f"{directory.path / MANIFEST_FILE}: unreadable ({error})") from None
        return directory

    @property
    def model_path(self) -> pathlib.Path:
        return self.path / MODEL_FILE

    @property
    def manifest_path(self) -> pathlib.Path:
        return self.path / MANIFEST_FILE

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text())

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")

    def tokenizer_files(self) -> list[pathlib.Path]:
        return [self.path / name for name in TOKENIZER_FILES if (self.path / name).is_file()]

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())


def check_output(path: str | os.PathLike, force: bool) -> pathlib.Path:
    """Refuse an existing output unless ``force``; return the resolved target path."""
    target = pathlib.Path(path)
    if target.exists() and not force:
        raise GraphoptError(f"{target} already exists (use --force to replace it)")
    if target.exists() and not target.is_dir():
        raise GraphoptError(f"{target} exists and is not a directory")
    return target


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False) -> Iterator[pathlib.Path]:
    """Yield a scratch directory beside ``path``; rename it to ``path`` when the block succeeds.

    On any exception (including KeyboardInterrupt) the scratch directory is removed and ``path``
    is left as it was.
    """
    target = check_output(path, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield scratch
        if target.exists():
            retired = target.parent / f".{target.name}.old-{os.getpid()}"
            os.rename(target, retired)
            os.rename(scratch, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(scratch, target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def copy_tokenizer(source: ModelDir, destination: pathlib.Path) -> None:
    for file in source.tokenizer_files():
        shutil.copy2(file, destination / file.name)


def derive(source: ModelDir, destination: pathlib.Path, step: dict[str, Any], **updates: Any) -> dict[str, Any]:
    """Write ``destination``'s manifest: the source's, with ``updates`` and one more lineage step."""
    manifest = source.manifest
    manifest.update(updates)
    manifest["lineage"] = [*manifest.get("lineage", []), step]
    copy_tokenizer(source, destination)
    ModelDir(destination).write_manifest(manifest)
    return manifest
