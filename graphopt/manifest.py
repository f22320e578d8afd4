"""``graphopt.json``: the typed manifest of a model directory, read and written only here.

A model directory comes from strangers as often as from graphopt, so reading one validates it:
every required fact is present with the right type, the per-layer lists have one entry per layer,
and the input/output names follow the decoder contract (``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.{i}.key|value`` -> ``logits``, ``present.{i}.key|value``).
Checking the manifest against the graph itself is :func:`graphopt.modeldir.check_graph`'s job.

Schema versions: 1 (graphopt 0.1, lineage steps in several shapes) and 2 (this module's). Both
load; writing always writes version 2. Unknown keys are kept as they are (``extra``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from graphopt.errors import GraphoptError

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)


GREEDY_OUTPUT = "next_token"


def io_names(layers: int) -> tuple[list[str], list[str]]:
    """The decoder contract's input and output names for ``layers`` layers."""
    cache = [f"{index}.{kind}" for index in range(layers) for kind in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{name}" for name in cache]
    outputs = ["logits"] + [f"present.{name}" for name in cache]
    return inputs, outputs


@dataclasses.dataclass
class LineageStep:
    """One step that made this model: its name, parameters, counts per produced op and figures."""

    name: str
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float | None = None
    modified: bool | None = None

    @classmethod
    def from_json(cls, data: Any) -> "LineageStep":
        if not isinstance(data, dict) or not isinstance(data.get("pass"), str):
            raise ValueError("a lineage step is an object with a 'pass' name")
        figures = dict(data.get("figures") or {})
        # Version 1 kept quantize's counts inside its figures.
        counts = data.get("counts") or figures.pop("counts", None) or {}
        return cls(name=data["pass"], parameters=dict(data.get("parameters") or {}), counts=dict(counts),
                   figures=figures, seconds=data.get("seconds"), modified=data.get("modified"))

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"pass": self.name, "parameters": self.parameters}
        if self.counts:
            data["counts"] = self.counts
        if self.modified is not None:
            data["modified"] = self.modified
        data["figures"] = self.figures
        if self.seconds is not None:
            data["seconds"] = self.seconds
        return data


# Required facts and their types; a bool is not accepted where an int is required.
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "family": str, "layers": int, "heads": int, "kv_heads": int, "head_dim": int, "vocab_size": int,
    "max_positions": int, "dtype": str, "inputs": list, "outputs": list,
}
_DTYPES = ("float32", "float16")


@dataclasses.dataclass
class Manifest:
    """What graphopt knows about a model directory's graph, and how it was made."""

    family: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    dtype: str
    inputs: list[str]
    outputs: list[str]
    model_type: str | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    tied_embeddings: bool = False
    opset: int | None = None
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)
    eos_token_ids: list[int] = dataclasses.field(default_factory=list)
    bos_token_id: int | None = None
    add_bos_token: bool = False
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    graphopt_version: str | None = None
    fusion: dict[str, Any] | None = None
    quantization: str | None = None
    layer_heads: list[int] | None = None
    layer_kv_heads: list[int] | None = None
    layer_intermediate_sizes: list[int] | None = None
    model_file: str = "model.onnx"
    runtimes: dict[str, Any] | None = None  # which runtimes load the directory, and why not (graphopt.interop)
    lineage: list[LineageStep] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    # --- derived facts -------------------------------------------------------------------

    def kv_heads_per_layer(self) -> list[int]:
        return list(self.layer_kv_heads or self.cache.get("kv_heads") or [self.kv_heads] * self.layers)

    def heads_per_layer(self) -> list[int]:
        return list(self.layer_heads or [self.heads] * self.layers)

    def intermediate_per_layer(self) -> list[int | None]:
        return list(self.layer_intermediate_sizes or [self.intermediate_size] * self.layers)

    @property
    def uses_gqa(self) -> bool:
        return bool(self.fusion) and (self.fusion.get("attention_op") or "").endswith("GroupQueryAttention")

    def last_step(self, name: str | None = None) -> LineageStep | None:
        """The newest lineage step (named ``name``, when given), or None."""
        steps = [step for step in self.lineage if name is None or step.name == name]
        return steps[-1] if steps else None

    def replace(self, **changes: Any) -> "Manifest":
        return dataclasses.replace(self, **changes)

    def with_step(self, step: LineageStep, **changes: Any) -> "Manifest":
        """A copy with ``changes`` applied and ``step`` appended to the lineage."""
        return dataclasses.replace(self, lineage=[*self.lineage, step], **changes)

    # --- JSON -----------------------------------------------------------------------------

    @classmethod
    def from_json(cls, data: Any, where: str = "graphopt.json") -> "Manifest":
        """Validate and type a parsed graphopt.json; a one-line GraphoptError names what is wrong."""
        if not isinstance(data, dict):
            raise GraphoptError(f"{where}: not a JSON object")
        version = data.get("format", 1)
        if version not in READABLE_VERSIONS:
            raise GraphoptError(f"{where}: manifest format {version!r} is not one this graphopt reads "
                                f"({', '.join(map(str, READABLE_VERSIONS))})")
        for key, kind in _REQUIRED.items():
            if key not in data:
                raise GraphoptError(f"{where}: missing '{key}'")
            value = data[key]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise GraphoptError(f"{where}: '{key}' should be {kind.__name__}, found {json.dumps(value)[:40]}")
            if kind is int and value <= 0:
                raise GraphoptError(f"{where}: '{key}' must be positive, found {value}")
        if data["dtype"] not in _DTYPES:
            raise GraphoptError(f"{where}: 'dtype' must be one of {', '.join(_DTYPES)}, found {data['dtype']!r}")
        layers = data["layers"]
        expected_inputs, expected_outputs = io_names(layers)
        # One optional output after the contract's: passes/greedy_head.py's on-device argmax.
        if data["inputs"] != expected_inputs or data["outputs"] not in (expected_outputs,
                                                                         expected_outputs + [GREEDY_OUTPUT]):
            raise GraphoptError(f"{where}: 'inputs'/'outputs' do not follow the decoder contract for {layers} layers")
        for key in ("layer_heads", "layer_kv_heads", "layer_intermediate_sizes"):
            values = data.get(key)
            if values is not None and (not isinstance(values, list) or len(values) != layers
                                       or not all(isinstance(v, int) and v > 0 for v in values)):
                raise GraphoptError(f"{where}: '{key}' must list one positive count per layer ({layers})")
        cache_heads = (data.get("cache") or {}).get("kv_heads")
        if cache_heads is not None and (not isinstance(cache_heads, list) or len(cache_heads) != layers):
            raise GraphoptError(f"{where}: 'cache.kv_heads' must list one count per layer ({layers})")
        try:
            lineage = [LineageStep.from_json(step) for step in data.get("lineage") or []]
        except ValueError as error:
            raise GraphoptError(f"{where}: {error}") from None
        known = {field.name for field in dataclasses.fields(cls)} - {"lineage", "extra"}
        values = {key: data[key] for key in known if key in data and data[key] is not None}
        extra = {key: value for key, value in data.items() if key not in known and key not in ("lineage", "format")}
        manifest = cls(**values, lineage=lineage, extra=extra)
        if not manifest.model_file or "/" in manifest.model_file or "\\" in manifest.model_file \
                or manifest.model_file.startswith("."):
            raise GraphoptError(f"{where}: 'model_file' must be a file name inside the model directory")
        return manifest

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"format": SCHEMA_VERSION}
        for field in dataclasses.fields(self):
            if field.name in ("lineage", "extra"):
                continue
            value = getattr(self, field.name)
            if value is None or (field.name == "model_file" and value == "model.onnx"):
                continue
            data[field.name] = value
        data.update(self.extra)
        data["lineage"] = [step.to_json() for step in self.lineage]
        return data


def read(path: pathlib.Path) -> Manifest:
    """Read and validate ``path`` (a graphopt.json)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise GraphoptError(f"{path}: unreadable ({getattr(error, 'strerror', None) or error})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise GraphoptError(f"{path}: not valid JSON ({error})") from None
    return Manifest.from_json(data, where=str(path))


def write(manifest: Manifest, path: pathlib.Path) -> None:
    path.write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")
