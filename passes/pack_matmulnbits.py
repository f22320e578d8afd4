"""Sibling MatMulNBits (or float MatMuls) on one input  =>  one with their weights side by side (+ Split, or GQA's packed query).

A decoder layer reads its normalized hidden state three times for q, k and v and twice for gate
and up. Each MatMulNBits call pays fixed costs on top of reading its weights: ONNX Runtime's
thread-pool dispatch, and with ``accuracy_level=4`` quantizing the activation to int8 once per
call. Packed, the layer pays them once per input instead of five times.

* q/k/v: three MatMulNBits whose outputs are exactly ``GroupQueryAttention``'s query, key and
  value (and nothing else reads them) become one with ``N = Nq + 2 Nkv``; GroupQueryAttention
  takes it as its packed query input with key and value absent, as ``graphopt fuse --pack-qkv``
  builds for float graphs.
* any other siblings (gate/up): one MatMulNBits with ``N = N1 + N2 + ...`` and a ``Split`` on the
  last axis that gives each old output back.
* ``affine`` sites (quantize_weights.integer_affine) are plain MatMulNBits with zero points on a
  shared ``[x, block sums of x]`` input: they pack like any other.
* ``PackMatMulNBitsPass("MatMul")`` packs float ``MatMul`` siblings with constant ``[K, N]``
  weights instead, joined along N, + Split, leaving the q/k/v that feed GroupQueryAttention alone
  (``graphopt fuse --pack-gate-up``: gate/up of a float graph, whose q/k/v ``--pack-qkv`` packs at
  fusion). On a GPU each one-row product is a kernel launch that costs more than reading its
  weights, and the Split is a cheaper kernel than the MatMul it replaces.

Exact: each output column of MatMulNBits reads only its own row of ``B``, its scales and its zero
points (a MatMul's column its own weight column), so weights concatenated along N compute the same
numbers (asserted bitwise in the tests for MatMulNBits; a float MatMul's kernel may sum in another
order at another width).
Siblings pack only when they agree on K, bits, block size, accuracy level and zero-point
presence, have constant weights and no ``g_idx`` or bias. The pass walks the main graph only (the
decoders graphopt writes have no subgraphs or functions).
"""

from __future__ import annotations

import collections
import logging

import numpy as np
import onnx_ir as ir

from graphopt.ir import node_tag, unique_value_name
from graphopt.passes.quantize_common import CONTRIB_DOMAIN, add_initializer

logger = logging.getLogger(__name__)

RULE = "pack_matmulnbits"
ATTENTION_OPS = ("GroupQueryAttention",)


def _attribute(node: ir.Node, name: str, default: int = 0) -> int:
    attribute = node.attributes.get(name)
    return default if attribute is None else attribute.as_int()


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def packable_signature(node: ir.Node) -> tuple | None:
    """What siblings must share to be packed, or None when this MatMulNBits (or MatMul) cannot be packed."""
    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
        weight = _constant(node.inputs[1])
        return None if weight is None or weight.ndim != 2 else ("MatMul", weight.shape[0], weight.dtype)
    if node.op_type != "MatMulNBits" or node.domain != CONTRIB_DOMAIN or len(node.inputs) > 4:
        return None
    weight, scales = node.inputs[1], node.inputs[2]
    zero_points = node.inputs[3] if len(node.inputs) > 3 else None
    if _constant(weight) is None or _constant(scales) is None:
        return None
    if zero_points is not None and _constant(zero_points) is None:
        return None
    if _attribute(node, "weight_prepacked"):
        return None
    return (_attribute(node, "K"), _attribute(node, "bits", 4), _attribute(node, "block_size"),
            _attribute(node, "accuracy_level"), zero_points is not None, scales.const_value.dtype,
            scales.shape.rank() if scales.shape is not None else None)


def merged_name(names: list[str], separator: str) -> str:
    """``a.q_proj.w``, ``a.k_proj.w``, ``a.v_proj.w`` -> ``a.qkv_proj.w``; ``gate_proj`` + ``up_proj`` -> ``gate_up_proj``.

    When the names differ in more than one ``separator``-delimited part, the first name with
    ``_packed`` appended.
    """
    split = [name.split(separator) for name in names]
    if len({len(parts) for parts in split}) != 1:
        return names[0] + "_packed"
    differing = [index for index in range(len(split[0])) if len({parts[index] for parts in split}) > 1]
    if len(differing) != 1:
        return names[0] + "_packed"
    index = differing[0]
    tokens = [parts[index] for parts in split]
    suffix = ""
    while all(len(token) > len(suffix) + 1 for token in tokens) and len({token[-len(suffix) - 1:] for token in tokens}) == 1:
        suffix = tokens[0][-len(suffix) - 1:]
    stems = [token[:len(token) - len(suffix)] if suffix else token for token in tokens]
    joined = ("" if all(len(stem) == 1 for stem in stems) else "_").join(stems) + suffix
    return separator.join([*split[0][:index], joined, *split[0][index + 1:]])


class PackMatMulNBitsPass(ir.passes.InPlacePass):
    """Pack sibling MatMulNBits, or with ``op_type="MatMul"`` float MatMuls (see the module docstring);
    ``counts`` says what was packed."""

    def __init__(self, op_type: str = "MatMulNBits"):
        super().__init__()
        self.op_type = op_type
        self.counts: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.counts = collections.Counter()
        graph = model.graph
        groups: dict[tuple, list[ir.Node]] = collections.defaultdict(list)
        for node in graph:
            signature = packable_signature(node) if node.op_type == self.op_type else None
            if signature is not None and node.inputs[0] is not None:
                groups[(id(node.inputs[0]), signature)].append(node)
        for nodes in groups.values():
            if len(nodes) >= 2:
                self._pack_group(graph, nodes)
        self.counts = dict(self.counts)
        return ir.passes.PassResult(model, modified=bool(self.counts))

    def _pack_group(self, graph: ir.Graph, siblings: list[ir.Node]) -> None:
        remaining = list(siblings)
        trio = self._attention_trio(remaining)
        if trio is not None:
            if self.op_type == "MatMulNBits":
                self._pack(graph, trio, attention=True)
                self.counts["q/k/v into GroupQueryAttention"] += 1
            remaining = [node for node in remaining if node not in trio]
        if len(remaining) >= 2:
            self._pack(graph, remaining, attention=False)
            self.counts[f"{len(remaining)} siblings + Split"] += 1

    @staticmethod
    def _attention_trio(siblings: list[ir.Node]) -> list[ir.Node] | None:
        """The three siblings that feed one attention op's query, key and value (in that order), if any."""
        by_output = {id(node.outputs[0]): node for node in siblings}
        for node in siblings:
            for consumer, index in node.outputs[0].uses():
                if consumer.op_type not in ATTENTION_OPS or consumer.domain != CONTRIB_DOMAIN or index != 0:
                    continue
                inputs = consumer.inputs
                if len(inputs) < 3 or any(value is None or id(value) not in by_output for value in inputs[:3]):
                    continue
                trio = [by_output[id(value)] for value in inputs[:3]]
                if len({id(member) for member in trio}) == 3 and all(
                        len(member.outputs[0].uses()) == 1 and not member.outputs[0].is_graph_output()
                        for member in trio):
                    return trio
        return None

    def _pack(self, graph: ir.Graph, siblings: list[ir.Node], attention: bool) -> None:
        first = siblings[0]
        names = [node.inputs[1].name or f"weight{index}" for index, node in enumerate(siblings)]
        name = merged_name([node.name or "" for node in siblings], "/")
        if first.op_type == "MatMul":
            weights = [_constant(node.inputs[1]) for node in siblings]
            widths = [weight.shape[1] for weight in weights]
            packed = ir.node("MatMul", [first.inputs[0], add_initializer(graph, merged_name(names, "."),
                                                                         np.concatenate(weights, axis=1))], name=name)
        else:
            widths = [_attribute(node, "N") for node in siblings]
            weight = np.concatenate([_constant(node.inputs[1]) for node in siblings], axis=0)
            scales = np.concatenate([_constant(node.inputs[2]) for node in siblings], axis=0)
            inputs = [first.inputs[0],
                      add_initializer(graph, merged_name(names, "."), weight),
                      add_initializer(graph, merged_name([node.inputs[2].name or "" for node in siblings], "."), scales)]
            if len(first.inputs) > 3 and first.inputs[3] is not None:
                zero_points = np.concatenate([_constant(node.inputs[3]) for node in siblings], axis=0)
                inputs.append(add_initializer(graph, merged_name([node.inputs[3].name or "" for node in siblings], "."),
                                              zero_points))
            attributes = {key: attribute.value for key, attribute in first.attributes.items()}
            attributes["N"] = sum(widths)
            packed = ir.node("MatMulNBits", inputs, attributes=attributes, domain=CONTRIB_DOMAIN, name=name)
        node_tag(packed, RULE)
        graph.insert_before(first, packed)
        output = packed.outputs[0]
        old_outputs = [node.outputs[0] for node in siblings]
        output.name = unique_value_name(graph, f"{packed.name}/output_0")
        output.type = old_outputs[0].type
        if old_outputs[0].shape is not None:
            output.shape = ir.Shape([*list(old_outputs[0].shape.dims)[:-1], sum(widths)])
        if attention:
            consumer = next(use for use, index in old_outputs[0].uses() if use.op_type in ATTENTION_OPS)
            consumer.replace_input_with(0, output)
            consumer.replace_input_with(1, None)
            consumer.replace_input_with(2, None)
        else:
            split_sizes = add_initializer(graph, f"{output.name}.split", np.array(widths, dtype=np.int64))
            split = ir.node("Split", [output, split_sizes], attributes={"axis": -1}, num_outputs=len(siblings),
                            name=f"{packed.name}/Split")
            node_tag(split, RULE)
            graph.insert_after(packed, split)
            for old, new in zip(old_outputs, split.outputs):
                name = old.name
                old.name = f"{name}.packed_away"
                new.name, new.type, new.shape = name, old.type, old.shape
                ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        for node in siblings:
            old_inputs = list(node.inputs)
            graph.remove(node, safe=True)
            for value in old_inputs:
                if value is not None and not value.uses() and value.name in graph.initializers:
                    del graph.initializers[value.name]
        logger.debug("packed %s into %s", [node.name for node in siblings], packed.name)
