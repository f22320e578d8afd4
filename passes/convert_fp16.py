"""float32 graph  =>  float16 graph, with the numerically sensitive ops kept in float32.

Built on ONNX Runtime's own converter, ``onnxruntime.transformers.float16.convert_float_to_float16``
(the one its transformer optimizer uses): it converts initializers, values and graph I/O, and puts
``Cast`` nodes around the nodes it is told to leave in float32. What this pass adds is the choice of
those nodes for graphopt's decoders:

* the variance chain of every RMSNorm written out (``Pow -> ReduceMean -> Add -> Sqrt ->
  Reciprocal``): ``x**2`` overflows float16 once ``|x|`` passes 256, which residual-stream outliers
  do; ``LayerNormalization`` nodes too (their statistics), when ``keep_norms``;
* ``Softmax`` (its input is the masked score sum, where the large negative mask meets the scores),
  when ``keep_softmax``;
* the ``logits`` output stays float32, so samplers and perplexity see the same dtype as before;
* and it bypasses the ``Cast`` round trips (float32 -> float16 -> float32) the converter leaves
  between two blocked nodes, where a kept-float32 value would overflow on its way through float16.

The KV-cache inputs and outputs become float16 (half the cache memory); the runtime reads the cache
dtype from the graph. Fused ops (``GroupQueryAttention``, ``SimplifiedLayerNormalization``...) run
in float16 with float32 accumulation inside their kernels and are not blocked.

Walks the main graph only (graphopt's decoders have no subgraphs or functions); the converter itself
also converts subgraphs.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.convenience
import onnx_ir.external_data
from onnx_ir.passes.common import TopologicalSortPass

from graphopt.errors import GraphoptError

logger = logging.getLogger(__name__)

# Ops after Pow that belong to the variance computation of a written-out RMSNorm.
_VARIANCE_CHAIN = ("ReduceMean", "Add", "Sqrt", "Reciprocal", "Div")
FLOAT32_OUTPUTS = ("logits",)


def is_float16(model: ir.Model) -> bool:
    """True when the graph already carries float16 activations (a cache input or any float16 initializer)."""
    for value in [*model.graph.inputs, *model.graph.initializers.values()]:
        if value.dtype == ir.DataType.FLOAT16:
            return True
    return False


def sensitive_nodes(graph: ir.Graph, keep_softmax: bool = True, keep_norms: bool = True) -> dict[str, list[str]]:
    """Names of the nodes to keep in float32, grouped by why: ``{"rms_variance": [...], ...}``."""
    kept: dict[str, list[str]] = {"rms_variance": [], "layer_norm": [], "softmax": []}
    for node in graph:
        if node.op_type == "Pow" and node.domain == "":
            chain = [node]
            current = node
            while True:
                users = [user for user, _ in current.outputs[0].uses()]
                if len(users) != 1 or users[0].op_type not in _VARIANCE_CHAIN or users[0].domain != "":
                    break
                current = users[0]
                chain.append(current)
                if current.op_type in ("Reciprocal", "Div"):
                    break
            if any(member.op_type == "ReduceMean" for member in chain):
                kept["rms_variance"] += [member.name for member in chain]
        elif keep_norms and node.op_type == "LayerNormalization" and node.domain == "":
            kept["layer_norm"].append(node.name)
        elif keep_softmax and node.op_type == "Softmax" and node.domain == "":
            kept["softmax"].append(node.name)
    return kept


def _cast_target(node: ir.Node) -> int | None:
    attribute = node.attributes.get("to")
    return attribute.as_int() if node.op_type == "Cast" and node.domain == "" and attribute is not None else None


def remove_cast_round_trips(graph: ir.Graph) -> int:
    """Bypass ``Cast(float32 -> float16) -> Cast(float16 -> float32)``; returns how many inner Casts went.

    The converter casts around each blocked node separately, so between two blocked nodes of one
    chain a float32 value would make a trip through float16 - and overflow there (``x**2`` of an
    RMSNorm reaches 2.5e5 in SmolLM2-135M, past float16's 65504).
    """
    removed = 0
    graph_outputs = {id(value) for value in graph.outputs}
    for node in list(graph):
        if _cast_target(node) != ir.DataType.FLOAT16 or node.inputs[0].dtype != ir.DataType.FLOAT:
            continue
        original = node.inputs[0]
        for user, _index in list(node.outputs[0].uses()):
            if _cast_target(user) != ir.DataType.FLOAT or id(user.outputs[0]) in graph_outputs:
                continue
            ir.convenience.replace_all_uses_with(user.outputs[0], original)
            graph.remove(user, safe=True)
            removed += 1
        if not node.outputs[0].uses() and id(node.outputs[0]) not in graph_outputs:
            graph.remove(node, safe=True)
    return removed


def drop_duplicate_casts(graph) -> int:
    """Remove Cast nodes (in a GraphProto) that redeclare the output of an identical earlier Cast.

    onnxruntime 1.31's converter inserts one float16->float32 Cast per consumer of a value feeding
    several float-only inputs, all with the same output name, which makes the model invalid
    (1.32 shares one Cast). Dropping the repeats gives what 1.32 produces.
    """
    produced: dict[str, tuple] = {}
    duplicates = []
    for node in graph.node:
        if node.op_type != "Cast" or len(node.output) != 1:
            continue
        signature = (tuple(node.input), tuple(attribute.SerializeToString() for attribute in node.attribute))
        if produced.get(node.output[0]) == signature:
            duplicates.append(node)
        else:
            produced.setdefault(node.output[0], signature)
    for node in duplicates:
        graph.node.remove(node)
    return len(duplicates)


class ConvertFloat16Pass(ir.passes.FunctionalPass):
    """Convert a float32 decoder to float16, keeping ``sensitive_nodes`` and the logits in float32.

    Functional: the converter works on a ``ModelProto``, so the result is a new ``ir.Model``.
    ``modified`` is False, and the model returned as is, when it already holds float16.
    ``counts`` gives the nodes kept in float32 per reason and the ``Cast`` nodes the conversion added.
    """

    def __init__(self, keep_softmax: bool = True, keep_norms: bool = True):
        super().__init__()
        self.keep_softmax = keep_softmax
        self.keep_norms = keep_norms
        self.counts: dict[str, int] = {}

    def requires(self, model: ir.Model) -> None:
        unnamed = [node for node in model.graph if not node.name]
        if unnamed:
            raise GraphoptError(f"float16 conversion needs named nodes; {len(unnamed)} have no name "
                                f"(first: {unnamed[0].op_type})")
        for value in model.graph.outputs:
            if value.name in FLOAT32_OUTPUTS and value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, None):
                raise GraphoptError(f"output {value.name} is {value.dtype}, expected float32")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        self.counts = {}
        if is_float16(model):
            # A functional pass returns a new model even when it changes nothing.
            return ir.passes.PassResult(model.clone(), modified=False)
        from graphopt.passes.fuse_attention import store_rotary_tables

        store_rotary_tables(model)  # computed for the CPU; float16 keeps no exact positions past 2048
        kept = sensitive_nodes(model.graph, self.keep_softmax, self.keep_norms)
        casts_before = sum(node.op_type == "Cast" for node in model.graph)
        # The converter reads tensor bytes from the proto, so external data must be in memory.
        ir.external_data.load_to_model(model)
        proto = ir.serde.serialize_model(model)
        keep_io = [value.name for value in model.graph.outputs if value.name in FLOAT32_OUTPUTS]
        # op_block_list=[] rather than the converter's default list: that list names classical-ML
        # and index ops (TopK, Range, CumSum, Min, Max...) that either take no float here or are
        # fine in float16; blocking by node name keeps the choice ours and visible in the counts.
        converted = convert_float_to_float16(
            proto, keep_io_types=keep_io, op_block_list=[],
            node_block_list=[name for names in kept.values() for name in names],
            # The mask's float32 minimum clips to -65504 instead of becoming -inf.
            max_finite_val=float(np.finfo(np.float16).max))
        drop_duplicate_casts(converted.graph)
        result = ir.serde.deserialize_model(converted)
        # The converter rewrites the value_info of every float value, also of the initializers it
        # keeps in float32 for blocked nodes (the RMSNorm exponent): the tensor decides.
        for value in result.graph.initializers.values():
            if value.const_value is not None and value.dtype != value.const_value.dtype:
                value.dtype = value.const_value.dtype
        round_trips = remove_cast_round_trips(result.graph)
        # The converter appends its Cast nodes at the end of the graph.
        TopologicalSortPass()(result)
        casts_after = sum(node.op_type == "Cast" for node in result.graph)
        self.counts = {f"kept_float32.{reason}": len(names) for reason, names in kept.items() if names}
        self.counts["Cast"] = casts_after - casts_before
        self.counts["cast_round_trips_removed"] = round_trips
        logger.debug("float16: %s", self.counts)
        return ir.passes.PassResult(result, modified=True)

    def ensures(self, model: ir.Model) -> None:
        if not self.counts:  # unchanged input
            return
        for value in model.graph.outputs:
            if value.name in FLOAT32_OUTPUTS and value.dtype != ir.DataType.FLOAT:
                raise GraphoptError(f"float16 conversion left output {value.name} as {value.dtype}, expected float32")
