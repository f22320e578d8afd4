"""What the quantization passes share: finding the linear layers (MatMul by a constant weight) of a graph.

A *linear site* is a ``MatMul(x, W)`` whose second input is a rank-2 float32 initializer, or the
``Transpose(perm=[1, 0])`` of one (how the export writes a tied LM head over the embedding
table). Attention's own MatMuls (both inputs computed) are not sites. Sites are found in the main
graph only; the exported decoders have no subgraphs or functions.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import re
from typing import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from graphopt.errors import GraphoptError

logger = logging.getLogger(__name__)

CONTRIB_DOMAIN = "com.microsoft"
# Ops a quantizer leaves behind; a graph holding any of them is quantized already.
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulNBits",
                           "MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul",
                           "GatherBlockQuantized", "QGemm"})
# Rules whose float MatMuls are never sites themselves: the block sums of an affine int4 linear, and
# the small d x d matrix rotation puts in front of a tied head (kept exact: it scales every logit).
MADE_BY_QUANTIZER = frozenset({"quantize_weights", "rotate_residual"})
# Op types a site may be; anything else named in --op-types cannot be quantized by these passes.
QUANTIZABLE_OPS = ("MatMul",)


@dataclasses.dataclass
class LinearSite:
    """One ``MatMul(activation, weight)`` with a constant weight, as ``[in_features, out_features]``."""

    node: ir.Node
    weight_value: ir.Value
    transposed: bool

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name

    @property
    def activation(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def source(self) -> ir.Value:
        """The initializer holding the weight (the Transpose's input for a tied head)."""
        if self.transposed:
            return self.weight_value.producer().inputs[0]
        return self.weight_value

    def weight(self) -> np.ndarray:
        """The weight as ``[in_features, out_features]`` float32."""
        array = self.source.const_value.numpy()
        return np.ascontiguousarray(array.T if self.transposed else array)

    @property
    def shape(self) -> tuple[int, int]:
        dims = tuple(self.source.shape.numpy())
        return (dims[1], dims[0]) if self.transposed else dims


def _transposed_initializer(value: ir.Value) -> bool:
    producer = value.producer()
    if producer is None or producer.op_type != "Transpose" or producer.domain not in ("", "ai.onnx"):
        return False
    source = producer.inputs[0]
    perm = producer.attributes.get("perm")
    return (source is not None and source.const_value is not None and source.shape is not None
            and len(source.shape) == 2 and perm is not None and list(perm.as_ints()) == [1, 0])


def site_of(node: ir.Node) -> LinearSite | None:
    """The node as a linear site, or None when it is not a MatMul by a constant 2-D float32 weight."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    if node.metadata_props.get("graphopt.rule") in MADE_BY_QUANTIZER:
        return None  # e.g. the block sums of an ``affine`` int4 linear: part of a quantized site
    weight = node.inputs[1]
    if weight is None:
        return None
    if weight.const_value is not None and weight.shape is not None and len(weight.shape) == 2:
        site = LinearSite(node, weight, transposed=False)
    elif _transposed_initializer(weight):
        site = LinearSite(node, weight, transposed=True)
    else:
        return None
    if site.source.const_value.dtype != ir.DataType.FLOAT:
        return None
    return site


def is_gated_down(site: LinearSite) -> bool:
    """A gated MLP's down projection: its input is ``act(gate) * up`` (a Mul of two computed values),
    or that product after ``passes.rotate``'s online Hadamard. Found by structure, not by name."""
    producer = site.activation.producer()
    if producer is not None and producer.op_type == "Reshape" and producer.metadata_props.get("graphopt.rule") == "rotate_residual":
        return True
    return (producer is not None and producer.op_type == "Mul" and len(producer.inputs) == 2
            and all(operand is not None and operand.const_value is None and operand.producer() is not None
                    for operand in producer.inputs))


def _normalized(name: str) -> str:
    """``/model/layers.0/mlp`` and ``/model/layers/0/mlp`` compare equal: dots and slashes both separate."""
    return re.sub(r"[./]+", "/", name)


def matches(node: ir.Node, patterns: Sequence[str]) -> bool:
    """Whether a node's name (glob, dots and slashes alike) or op type matches any pattern."""
    name = _normalized(node.name or "")
    for pattern in patterns:
        wanted = _normalized(pattern)
        if pattern == node.op_type or fnmatch.fnmatchcase(name, wanted):
            return True
        # A plain prefix names a module: "/model/layers.0/mlp" covers every node under it.
        if not any(c in pattern for c in "*?[") and name.startswith(wanted.rstrip("/") + "/"):
            return True
    return False


def linear_sites(graph: ir.Graph, exclude: Sequence[str] = (), head: bool = True) -> list[LinearSite]:
    """The graph's linear sites in graph order, without those matching ``exclude`` (and the head unless ``head``)."""
    sites = []
    for node in graph:
        site = site_of(node)
        if site is None or matches(node, exclude):
            continue
        if not head and is_head(site):
            continue
        sites.append(site)
    return sites


def is_head(site: LinearSite) -> bool:
    """The LM head: by the decoder contract, the site whose output is the graph's ``logits``, or a tied
    (transposed) embedding weight; no family's module names are needed."""
    return site.transposed or site.node.outputs[0].name == "logits"


def check_patterns(graph: ir.Graph, patterns: Iterable[str]) -> None:
    """Refuse --exclude patterns that match no node and no op type: most likely a typo."""
    op_types = {node.op_type for node in graph}
    for pattern in patterns:
        if pattern in op_types:
            continue
        if not any(matches(node, [pattern]) for node in graph):
            raise GraphoptError(f"--exclude {pattern!r} matches no node name or op type in the graph "
                                f"(node names look like {_example_name(graph)})")


def _example_name(graph: ir.Graph) -> str:
    for node in graph:
        if site_of(node) is not None and node.name:
            return node.name
    return "'/model/layers/0/mlp/down_proj/MatMul'"


def quantized_ops(model: ir.Model) -> list[str]:
    """Quantized op types present in the model's main graph."""
    return sorted({node.op_type for node in model.graph if node.op_type in QUANTIZED_OPS})


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer called ``name`` (made unique) and return its value."""
    base, index = name, 1
    while name in graph.initializers:
        name, index = f"{base}_{index}", index + 1
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def set_float32(value: ir.Value, array: np.ndarray) -> None:
    """Replace a constant's tensor by ``array`` as float32, keeping its name (folded scales, rotated weights)."""
    value.const_value = ir.tensor(array.astype(np.float32), name=value.name)


def drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    """Remove an initializer, or a Transpose of one, that nothing reads any more."""
    if value.uses() or value in graph.outputs:
        return
    producer = value.producer()
    if producer is not None:
        source = producer.inputs[0]
        graph.remove(producer, safe=True)
        drop_if_unused(graph, source)
    elif value.name in graph.initializers:
        del graph.initializers[value.name]


def weight_name(site: LinearSite, suffix: str) -> str:
    """A readable initializer name for a site's quantized weight, e.g. ``model.layers.0.mlp.up_proj.weight_q4``."""
    base = site.source.name or site.name.strip("/").replace("/", ".")
    return f"{base}_{suffix}"
