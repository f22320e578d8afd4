"""Quantized embedding table: ``Gather(table, ids)``  =>  ``com.microsoft.GatherBlockQuantized(codes, ids, scales)``.

A tied model reads one float table twice: the embedding ``Gather`` and the LM head (a ``MatMul``
by its transpose). Once the head is a symmetric ``MatMulNBits`` (no zero-point input: 8 bits with
the default zero point 128, or 4 bits with 8), the ``Gather`` reads the very same codes and scales
through two ``Reshape`` nodes (``[N, blocks, bytes] -> [N, K * bits / 8]`` and
``[N * blocks] -> [N, blocks]``, which ONNX Runtime folds at session start), so the table is
stored once, quantized, and the float table is dropped. Without such a head (a head kept in float,
or a head with zero points) the table gets its own symmetric codes; a float table that a float
head still reads is left alone (quantizing it would only add bytes).

``GatherBlockQuantized`` (ONNX Runtime >= 1.20, ``bits`` attribute for 8 bits) dequantizes each
row it gathers as ``(code - zero) * scale`` with the same default zero points as ``MatMulNBits``
(checked numerically in the tests). The pass walks the main graph only.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from graphopt.errors import GraphoptError
from graphopt.ir import node_tag
from graphopt.passes.quantize_common import CONTRIB_DOMAIN, add_initializer, drop_if_unused
from graphopt.passes.quantize_weights import pack

logger = logging.getLogger(__name__)

RULE = "quantize_embedding"


def symmetric_codes(table: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``[V, K]`` -> symmetric codes ``[V, blocks, block_size]`` (uint8, zero ``2^(bits-1)``) and scales ``[V, blocks]``."""
    rows, columns = table.shape
    if columns % block_size:
        raise GraphoptError(f"embedding width {columns} is not a multiple of the block size {block_size}")
    blocks = table.astype(np.float64).reshape(rows, columns // block_size, block_size)
    half = 2 ** (bits - 1)
    amax = np.abs(blocks).max(axis=-1)
    # 8 bits: amax / 127 as Q8_0 (so a Q8_0 table round-trips exactly); 4 bits: amax / 7, as symmetric int4.
    scale = np.where(amax > 0, amax / (half - 1), 1.0).astype(np.float32)
    codes = np.clip(np.round(blocks / scale[..., None].astype(np.float64)) + half, 0, 2 * half - 1)
    return codes.astype(np.uint8), scale


def _embedding_gathers(graph: ir.Graph) -> list[ir.Node]:
    gathers = []
    for node in graph:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
            continue
        table = node.inputs[0]
        axis = node.attributes.get("axis")
        if (table is None or table.const_value is None or table.shape is None or len(table.shape) != 2
                or table.const_value.dtype != ir.DataType.FLOAT or (axis is not None and axis.as_int() != 0)):
            continue
        gathers.append(node)
    return gathers


def _symmetric_head(graph: ir.Graph, table_name: str) -> ir.Node | None:
    """The MatMulNBits quantized from ``table_name`` without zero points, if any.

    An ``affine`` head has zero points and residual rows for its input's block sums
    (quantize_weights.integer_affine): a Gather of its codes would read a different table, so the
    table gets its own codes.
    """
    for node in graph:
        if (node.op_type == "MatMulNBits" and node.domain == CONTRIB_DOMAIN
                and node.metadata_props.get("graphopt.weight_source") == table_name
                and len([value for value in node.inputs if value is not None]) == 3):
            return node
    return None


class EmbeddingQuantizePass(ir.passes.InPlacePass):
    """Quantize constant embedding tables read by ``Gather`` (see the module docstring).

    Args:
        bits: 4 or 8, for a table that cannot share a quantized head's codes.
        block_size: block along the embedding width for such a table.
    """

    def __init__(self, bits: int = 8, block_size: int = 32):
        super().__init__()
        if bits not in (4, 8):
            raise GraphoptError("embedding quantization supports 4 or 8 bits")
        self.bits, self.block_size = bits, block_size
        self.counts: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.counts = {}
        graph = model.graph
        for gather in _embedding_gathers(graph):
            table = gather.inputs[0]
            head = _symmetric_head(graph, table.name)
            if head is not None:
                key = self._share(graph, gather, head)
            elif any(use.node is not gather for use in table.uses()):
                logger.info("embedding %s is also read in float elsewhere; left in float", table.name)
                continue
            else:
                key = self._own(graph, gather)
            self.counts[key] = self.counts.get(key, 0) + 1
        modified = bool(self.counts)
        if modified:
            model.opset_imports.setdefault(CONTRIB_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=modified)

    def _share(self, graph: ir.Graph, gather: ir.Node, head: ir.Node) -> str:
        bits = head.attributes["bits"].as_int()
        block_size = head.attributes["block_size"].as_int()
        rows, columns = head.attributes["N"].as_int(), head.attributes["K"].as_int()
        if columns % block_size:
            raise GraphoptError(f"the tied head's width {columns} is not a multiple of its block size {block_size}")
        codes_value, scales_value = head.inputs[1], head.inputs[2]
        name = gather.inputs[0].name
        code_shape = add_initializer(graph, f"{name}_codes_shape", np.array([rows, columns * bits // 8], dtype=np.int64))
        scale_shape = add_initializer(graph, f"{name}_scales_shape", np.array([rows, columns // block_size], dtype=np.int64))
        code_view = ir.node("Reshape", [codes_value, code_shape], name=f"{gather.name}_codes")
        scale_view = ir.node("Reshape", [scales_value, scale_shape], name=f"{gather.name}_scales")
        self._replace(graph, gather, code_view, scale_view, bits, block_size)
        return f"GatherBlockQuantized(bits={bits}, shared with the head)"

    def _own(self, graph: ir.Graph, gather: ir.Node) -> str:
        table = gather.inputs[0]
        codes, scales = symmetric_codes(table.const_value.numpy(), self.bits, self.block_size)
        rows = codes.shape[0]
        packed = pack(codes, self.bits).reshape(rows, -1)
        codes_value = add_initializer(graph, f"{table.name}_q{self.bits}", packed)
        scales_value = add_initializer(graph, f"{table.name}_q{self.bits}_scales", scales)
        self._replace(graph, gather, None, None, self.bits, self.block_size, codes_value, scales_value)
        return f"GatherBlockQuantized(bits={self.bits})"

    def _replace(self, graph: ir.Graph, gather: ir.Node, code_view: ir.Node | None, scale_view: ir.Node | None,
                 bits: int, block_size: int, codes_value: ir.Value | None = None,
                 scales_value: ir.Value | None = None) -> None:
        views = [view for view in (code_view, scale_view) if view is not None]
        if views:
            codes_value, scales_value = code_view.outputs[0], scale_view.outputs[0]
        quantized = ir.node("GatherBlockQuantized", [codes_value, gather.inputs[1], scales_value],
                            attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": block_size, "bits": bits},
                            domain=CONTRIB_DOMAIN, name=f"{gather.name}_Q{bits}")
        for node in (*views, quantized):
            node_tag(node, RULE)
        graph.insert_before(gather, [*views, quantized])
        output, replacement = gather.outputs[0], quantized.outputs[0]
        name = output.name
        output.name = f"{name}.replaced"
        replacement.name, replacement.shape, replacement.type = name, output.shape, output.type
        table = gather.inputs[0]
        ir.convenience.replace_all_uses_with(output, replacement, replace_graph_outputs=True)
        graph.remove(gather, safe=True)
        drop_if_unused(graph, table)
