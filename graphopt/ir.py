"""IR helpers shared by the passes: loading and saving model directories' graphs with onnx_ir."""

from __future__ import annotations

import logging
import math
import os
import pathlib

import onnx_ir as ir

logger = logging.getLogger(__name__)


def load(path: str | os.PathLike) -> ir.Model:
    """Load a model with its external data resolved relative to its own directory."""
    return ir.load(str(path))


def save(model: ir.Model, path: str | os.PathLike) -> None:
    """Save ``model`` to ``path`` with initializers over 1 KiB in one external data file beside it (``path`` + .data)."""
    ir.save(model, str(path), external_data=f"{pathlib.Path(path).name}.data", size_threshold_bytes=1024)


def parameter_count(model) -> int:
    """Elements in all initializers, from shapes only (external data is not read).

    Accepts an ``onnx.ModelProto`` or an ``onnx_ir.Model``.
    """
    if isinstance(model, ir.Model):
        return sum(math.prod(value.shape.numpy()) for value in model.graph.initializers.values() if value.shape is not None)
    return sum(math.prod(tensor.dims) for tensor in model.graph.initializer)


def node_tag(node: ir.Node, rule: str) -> None:
    """Record on a new node which graphopt rule made it (in ``metadata_props``)."""
    node.metadata_props["graphopt.rule"] = rule


def unique_value_name(graph: ir.Graph, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : a value name no node output, initializer or input uses."""
    taken = {value.name for node in graph for value in node.outputs} | set(graph.initializers)
    taken |= {value.name for value in graph.inputs}
    name, index = base, 1
    while name in taken:
        name, index = f"{base}_{index}", index + 1
    return name
