"""The model directory: ``model.onnx`` (+ external data), tokenizer files and ``graphopt.json``.

Every command reads one model directory and writes a new one (atomically: :func:`atomic_output`).
A model directory may come from a stranger, so opening one checks it (:meth:`ModelDir.open`): a
typed, valid manifest (:mod:`graphopt.manifest`), a graph whose inputs, outputs and vocabulary
agree with it, external data that is present, of the right size and inside the folder, tokenizer
files that parse and are not links out of the folder. Every failure is one line
(``GraphoptError``). This module needs neither torch nor onnx: the graph check reads the file's
header itself (:mod:`graphopt.onnx_header`), also in the torch-free runtime.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Iterable, Iterator

from graphopt import interop
from graphopt import manifest as manifest_io
from graphopt import onnx_header
from graphopt.errors import GraphoptError
from graphopt.manifest import LineageStep, Manifest

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "graphopt.json"
REPORT_FILE = "report.json"  # marks a `graphopt optimize` output
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "vocab.json", "merges.txt")
TOKENIZER_JSON = "tokenizer.json"
JSON_TOKENIZER_FILES = tuple(name for name in TOKENIZER_FILES if name.endswith(".json"))


class ModelDir:
    """A graphopt model directory on disk; ``manifest`` is read (and validated) once."""

    def __init__(self, path: str | os.PathLike, manifest: Manifest | None = None):
        self.path = pathlib.Path(path)
        self._manifest = manifest

    @classmethod
    def open(cls, path: str | os.PathLike, parse_tokenizer: bool = True) -> "ModelDir":
        """Open and check an existing model directory (see the module docstring); GraphoptError says what is wrong.

        ``parse_tokenizer=False`` leaves ``tokenizer.json`` (the largest JSON file, ~30 ms to parse) to
        the caller that loads it anyway (``graphopt.runtime.Tokenizer``, with the same one-line error).
        """
        directory = cls(path)
        if not directory.path.exists():
            raise GraphoptError(f"{directory.path}: no such directory")
        if not directory.path.is_dir():
            raise GraphoptError(f"{directory.path}: not a directory (expected a graphopt model directory)")
        if not (directory.path / MANIFEST_FILE).is_file():
            raise GraphoptError(f"{directory.path}: not a graphopt model directory (no {MANIFEST_FILE})")
        _check_inside(directory.path, directory.path / MANIFEST_FILE)
        manifest = directory.manifest
        if not directory.model_path.is_file():
            raise GraphoptError(f"{directory.path}: not a graphopt model directory (no {manifest.model_file})")
        _check_inside(directory.path, directory.model_path)
        for file in directory.tokenizer_files():
            if file.name in JSON_TOKENIZER_FILES and (parse_tokenizer or file.name != TOKENIZER_JSON):
                try:
                    json.loads(file.read_text(encoding="utf-8"))
                except (ValueError, OSError) as error:
                    raise GraphoptError(f"{file}: damaged ({str(error).splitlines()[0]})") from None
        if directory.model_path.suffix == ".onnx":
            check_graph(directory)
        return directory

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            self._manifest = manifest_io.read(self.manifest_path)
        return self._manifest

    @property
    def model_path(self) -> pathlib.Path:
        return self.path / (self._manifest.model_file if self._manifest is not None else MODEL_FILE)

    @property
    def manifest_path(self) -> pathlib.Path:
        return self.path / MANIFEST_FILE

    def write_manifest(self, manifest: Manifest) -> None:
        manifest_io.write(manifest, self.manifest_path)
        self._manifest = manifest

    def update_extra(self, **values) -> None:
        """Rewrite the manifest with ``values`` added to its free-form ``extra`` facts."""
        self.write_manifest(self.manifest.replace(extra={**self.manifest.extra, **values}))

    def tokenizer_files(self) -> list[pathlib.Path]:
        """The tokenizer files present; a link that leads out of the directory is refused."""
        files = [self.path / name for name in TOKENIZER_FILES if (self.path / name).is_file()]
        for file in files:
            _check_inside(self.path, file)
        return files

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())


def _check_inside(root: pathlib.Path, path: pathlib.Path) -> None:
    """Refuse ``path`` when it (or a link on the way) resolves outside ``root``."""
    resolved, base = path.resolve(), root.resolve()
    if resolved != base and base not in resolved.parents:
        raise GraphoptError(f"{path}: links outside the model directory (to {resolved}); refusing to read it")


def check_graph(directory: ModelDir) -> None:
    """The graph against the manifest, and every external-data file present, sized and inside the folder."""
    path = directory.model_path
    try:
        header = onnx_header.read(path.read_bytes())
    except (ValueError, OSError) as error:
        raise GraphoptError(f"{path}: damaged, not a readable ONNX model ({error})") from None
    manifest = directory.manifest
    if header.inputs != manifest.inputs or header.outputs != manifest.outputs:
        raise GraphoptError(f"{path}: the graph's inputs/outputs ({len(header.inputs)}/{len(header.outputs)}) do not "
                            f"match {MANIFEST_FILE} ({manifest.layers} layers)")
    if header.logits_width and header.logits_width != manifest.vocab_size:
        raise GraphoptError(f"{path}: the graph's logits have {header.logits_width} entries, {MANIFEST_FILE} says "
                            f"vocab_size {manifest.vocab_size}")
    needed: dict[str, int] = {}
    for tensor in header.external:
        location = tensor.entries.get("location", "")
        parts = pathlib.PurePosixPath(location.replace("\\", "/")).parts
        if not location or pathlib.PurePath(location).is_absolute() or ".." in parts:
            raise GraphoptError(f"{path}: weight {tensor.name} points outside the model directory ({location!r})")
        try:
            end = int(tensor.entries.get("offset", 0) or 0) + int(tensor.entries.get("length", 0) or 0)
        except ValueError:
            raise GraphoptError(f"{path}: damaged, weight {tensor.name} has a non-numeric offset or length") from None
        needed[location] = max(needed.get(location, 0), end)
    for location, end in needed.items():
        file = directory.path / location
        if not file.is_file():
            raise GraphoptError(f"{directory.path}: damaged, external weights {location} are missing")
        _check_inside(directory.path, file)
        size = file.stat().st_size
        if size < end:
            raise GraphoptError(f"{directory.path}: damaged, {location} is truncated ({size:,} of {end:,} bytes)")


def check_output(path: str | os.PathLike, force: bool, sources: Iterable[str | os.PathLike | None] = ()) -> pathlib.Path:
    """Refuse an output that cannot be (re)placed; return the target path. Run it before any work.

    Without ``force`` an existing output is refused. With it, only a directory graphopt wrote is
    replaced, and never the current directory (or one above it) nor one that holds a source.
    """
    target = pathlib.Path(path)
    resolved = target.resolve()
    cwd = pathlib.Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise GraphoptError(f"{target}: is the current directory (or holds it); choose a new output directory")
    for source in sources:
        if source is None or not os.path.exists(source):
            continue
        source_path = pathlib.Path(source).resolve()
        if source_path == resolved or resolved in source_path.parents:
            raise GraphoptError(f"{target}: holds the input {source}; choose another output directory")
    if not target.exists() and not target.is_symlink():
        return target
    if not force:
        raise GraphoptError(f"{target} already exists (use --force to replace it)")
    if target.is_symlink() or not target.is_dir():
        raise GraphoptError(f"{target} exists and is not a directory; --force replaces only directories graphopt wrote")
    # A model directory, or a `graphopt optimize` output (report and target).
    if not (target / MANIFEST_FILE).is_file() and not ((target / REPORT_FILE).is_file() and (target / "target").is_dir()):
        raise GraphoptError(f"{target} exists and is not a graphopt output (no {MANIFEST_FILE} or {REPORT_FILE}); "
                            "--force replaces only directories graphopt wrote")
    return target


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False,
                  sources: Iterable[str | os.PathLike | None] = ()) -> Iterator[pathlib.Path]:
    """Yield a scratch directory beside ``path``; rename it to ``path`` when the block succeeds.

    On any exception (KeyboardInterrupt and the CLI's signal exceptions included) the scratch
    directory is removed and ``path`` is left as it was. The output gets the user's umask.
    """
    sources = list(sources)
    target = check_output(path, force, sources)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        os.chmod(scratch, 0o777 & ~_umask())  # mkdtemp makes it 0700: a service account could not read it
        yield scratch
        check_output(target, force, sources)  # another writer may have finished meanwhile
        try:
            if target.exists():
                retired = target.parent / f".{target.name}.old-{os.getpid()}"
                os.rename(target, retired)
                os.rename(scratch, target)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                os.rename(scratch, target)
        except OSError as error:
            raise GraphoptError(f"{target}: could not be put in place ({error.strerror}); another process may have "
                                "written it at the same time") from None
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def derive(source: ModelDir, destination: pathlib.Path, step: LineageStep, **changes) -> Manifest:
    """Write ``destination``'s manifest: the source's, with ``changes`` and one more lineage step."""
    manifest = source.manifest.with_step(step, **changes)
    for file in source.tokenizer_files():
        shutil.copyfile(file, destination / file.name)
    manifest = interop.write_runtime_files(destination, manifest, source=source.path)
    ModelDir(destination).write_manifest(manifest)
    return manifest
