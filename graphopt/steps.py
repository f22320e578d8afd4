"""The step protocol: a step turns a source model directory into a new one; one runner does the rest.

A step (fuse, quantize, prune, convert, ...) declares its name and its typed parameters (a frozen
``StepConfig`` that defaults and validates every field once, in ``__post_init__``), may refuse a
source it cannot take (``refuse``) and rewrites the loaded graph (``run``). :func:`run_step` does
the rest for every caller (CLI commands, `graphopt optimize`, `graphopt draft`): open and check
the source and the output before any work, write atomically, run the step's numeric check, append
one lineage step. Steps register in :data:`graphopt.recipes.STEPS`; progress goes through ``logging``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import tempfile
import time
from typing import Any, ClassVar

import onnx_ir as ir

from graphopt import ir as graph_ir
from graphopt.errors import GraphoptError
from graphopt.manifest import LineageStep
from graphopt.modeldir import MODEL_FILE, ModelDir, atomic_output, check_output, derive

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """A step's parameters. Subclasses validate in ``__post_init__`` and raise ``GraphoptError``."""

    def describe(self) -> dict[str, Any]:
        """The parameters as recorded in the lineage (JSON values)."""
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_parameters(cls, parameters: dict[str, Any], where: str = "") -> "StepConfig":
        """Build from a recipe's or caller's keyword parameters; an unknown name is a one-line error."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(parameters) - names)
        if unknown:
            raise GraphoptError(f"{where}unknown parameter {unknown[0]!r}; this step takes {', '.join(sorted(names))}")
        return cls(**parameters)


def check_choice(option: str, value: Any, choices) -> None:
    """A one-line ``GraphoptError`` naming ``option`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise GraphoptError(f"{option} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


@dataclasses.dataclass
class StepOutput:
    """What a step's ``run`` made: the rewritten graph, what it counted, and manifest changes."""

    model: ir.Model
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    modified: bool | None = None
    changes: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """What the runner returns: the written model directory and its new lineage step."""

    output: ModelDir
    step: LineageStep


class Step:
    """Base class of every model-directory step."""

    name: ClassVar[str]
    config_type: ClassVar[type[StepConfig]]

    def refuse(self, source: ModelDir, config: StepConfig) -> None:
        """Raise ``GraphoptError`` when ``source`` cannot take this step (before any work)."""

    def run(self, source: ModelDir, model: ir.Model, config: StepConfig, work: pathlib.Path) -> StepOutput:
        """Rewrite ``model`` (loaded from ``source``); ``work`` is a scratch folder removed afterwards."""
        raise NotImplementedError

    def check(self, source: ModelDir, written: ModelDir, config: StepConfig) -> dict[str, Any]:
        """Numeric check of the written model against the source (figures for the lineage); ValidationError if it fails."""
        return {}


def run_step(step: Step, source_dir: str | os.PathLike, output: str | os.PathLike, config: StepConfig | None = None,
             force: bool = False) -> StepRecord:
    """Run ``step`` on ``source_dir`` into a new model directory ``output`` (see the module docstring)."""
    config = config if config is not None else step.config_type()
    source = ModelDir.open(source_dir)
    check_output(output, force, sources=[source.path])
    step.refuse(source, config)
    started = time.perf_counter()
    model = graph_ir.load(source.model_path)
    with atomic_output(output, force=force, sources=[source.path]) as scratch:
        with tempfile.TemporaryDirectory(prefix=f".{scratch.name}.", dir=scratch.parent) as work:
            made = step.run(source, model, config, pathlib.Path(work))
        graph_ir.save(made.model, scratch / MODEL_FILE)
        lineage = LineageStep(step.name, config.describe(), dict(made.counts), dict(made.figures), modified=made.modified)
        changes = made.changes
        del model, made  # weights can be hundreds of MB; the check loads its own sessions
        written = ModelDir(scratch, derive(source, scratch, lineage, **changes))
        lineage.figures.update(step.check(source, written, config))
        lineage.seconds = round(time.perf_counter() - started, 1)
        written.write_manifest(written.manifest)
    return StepRecord(ModelDir(output, written.manifest), lineage)
