"""Sibling MatMulNBits on one input  =>  one MatMulNBits with their weights side by side (+ Split, or GQA's packed query).

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
* ``affine`` sites (quantize_weights: the MatMulNBits output plus ``block sums @ offsets``) pack
  with their offset tables side by side too: one offset MatMul and one Add per packed node instead
  of one per sibling, and q/k/v still reach GroupQueryAttention packed.

Exact: each output column of MatMulNBits reads only its own row of ``B``, its scales and its zero
points, so rows concatenated along N compute the same numbers (asserted bitwise in the tests).
Siblings pack only when they agree on K, bits, block size, accuracy level and zero-point
presence, have constant weights and no ``g_idx`` or bias. The pass walks the main graph only (the
decoders graphopt writes have no subgraphs or functions).
"""

from __future__ import annotations

import collections
import dataclasses
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
    """What siblings must share to be packed, or None when this MatMulNBits cannot be packed."""
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


@dataclasses.dataclass
class _Site:
    """A MatMulNBits and, for an ``affine`` site, its ``Add(output, MatMul(sums, offsets))`` tail."""

    node: ir.Node
    add: ir.Node | None = None
    correction: ir.Node | None = None  # MatMul(sums, offsets)
    offsets: np.ndarray | None = None  # [K / block, N], as stored (float16 behind a Cast, or float32)

    @property
    def output(self) -> ir.Value:
        """What the rest of the graph reads: the Add's output for an affine site."""
        return (self.add or self.node).outputs[0]

    @property
    def sums(self) -> ir.Value | None:
        return self.correction.inputs[0] if self.correction is not None else None


def _site(node: ir.Node) -> _Site:
    """``node`` with its affine tail when its only reader is ``Add(node, MatMul(sums, [Cast](constant)))``."""
    uses = node.outputs[0].uses()
    if len(uses) != 1 or node.outputs[0].is_graph_output():
        return _Site(node)
    add, index = uses[0]
    other = add.inputs[1 - index] if add.op_type == "Add" and len(add.inputs) == 2 else None
    correction = other.producer() if other is not None else None
    if index != 0 or correction is None or correction.op_type != "MatMul" or len(other.uses()) != 1:
        return _Site(node)
    table = correction.inputs[1]
    source = table.producer()
    if source is not None and source.op_type == "Cast" and len(table.uses()) == 1:
        offsets = _constant(source.inputs[0])
    else:
        offsets = _constant(table)
    if offsets is None or offsets.ndim != 2:
        return _Site(node)
    return _Site(node, add, correction, offsets)


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
    """Pack sibling MatMulNBits (see the module docstring); ``counts`` says what was packed."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.counts = collections.Counter()
        graph = model.graph
        groups: dict[tuple, list[ir.Node]] = collections.defaultdict(list)
        for node in graph:
            signature = packable_signature(node)
            if signature is not None and node.inputs[0] is not None:
                groups[(id(node.inputs[0]), signature)].append(node)
        for nodes in groups.values():
            if len(nodes) < 2:
                continue
            # Affine sites pack with affine sites reading the same block sums, plain ones with plain ones.
            kinds: dict[tuple, list[_Site]] = collections.defaultdict(list)
            for site in map(_site, nodes):
                kinds[(id(site.sums), site.offsets.dtype if site.offsets is not None else None)].append(site)
            for siblings in kinds.values():
                if len(siblings) >= 2:
                    self._pack_group(graph, siblings)
        self.counts = dict(self.counts)
        return ir.passes.PassResult(model, modified=bool(self.counts))

    def _pack_group(self, graph: ir.Graph, siblings: list[_Site]) -> None:
        remaining = list(siblings)
        trio = self._attention_trio(remaining)
        if trio is not None:
            self._pack(graph, trio, attention=True)
            self.counts["q/k/v into GroupQueryAttention"] += 1
            remaining = [site for site in remaining if site not in trio]
        if len(remaining) >= 2:
            self._pack(graph, remaining, attention=False)
            self.counts[f"{len(remaining)} siblings + Split"] += 1

    @staticmethod
    def _attention_trio(siblings: list[_Site]) -> list[_Site] | None:
        """The three siblings that feed one attention op's query, key and value (in that order), if any."""
        by_output = {id(site.output): site for site in siblings}
        for site in siblings:
            for consumer, index in site.output.uses():
                if consumer.op_type not in ATTENTION_OPS or consumer.domain != CONTRIB_DOMAIN or index != 0:
                    continue
                inputs = consumer.inputs
                if len(inputs) < 3 or any(value is None or id(value) not in by_output for value in inputs[:3]):
                    continue
                trio = [by_output[id(value)] for value in inputs[:3]]
                if len({id(member) for member in trio}) == 3 and all(
                        len(member.output.uses()) == 1 and not member.output.is_graph_output()
                        for member in trio):
                    return trio
        return None

    def _pack(self, graph: ir.Graph, sites: list[_Site], attention: bool) -> None:
        siblings = [site.node for site in sites]
        first = siblings[0]
        widths = [_attribute(node, "N") for node in siblings]
        weight = np.concatenate([_constant(node.inputs[1]) for node in siblings], axis=0)
        scales = np.concatenate([_constant(node.inputs[2]) for node in siblings], axis=0)
        names = [node.inputs[1].name or f"weight{index}" for index, node in enumerate(siblings)]
        inputs = [first.inputs[0],
                  add_initializer(graph, merged_name(names, "."), weight),
                  add_initializer(graph, merged_name([node.inputs[2].name or "" for node in siblings], "."), scales)]
        if len(first.inputs) > 3 and first.inputs[3] is not None:
            zero_points = np.concatenate([_constant(node.inputs[3]) for node in siblings], axis=0)
            inputs.append(add_initializer(graph, merged_name([node.inputs[3].name or "" for node in siblings], "."),
                                          zero_points))
        attributes = {name: attribute.value for name, attribute in first.attributes.items()}
        attributes["N"] = sum(widths)
        packed = ir.node("MatMulNBits", inputs, attributes=attributes, domain=CONTRIB_DOMAIN,
                         name=merged_name([node.name or "" for node in siblings], "/"))
        node_tag(packed, RULE)
        graph.insert_before(first, packed)
        output = packed.outputs[0]
        old_outputs = [site.output for site in sites]
        output.name = unique_value_name(graph, f"{packed.name}/output_0")
        output.type = old_outputs[0].type
        if old_outputs[0].shape is not None:
            output.shape = ir.Shape([*list(old_outputs[0].shape.dims)[:-1], sum(widths)])
        added = [packed]
        if sites[0].add is not None:
            output = self._add_offsets(graph, sites, packed, added)
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
            graph.insert_after(added[-1], split)
            for old, new in zip(old_outputs, split.outputs):
                name = old.name
                old.name = f"{name}.packed_away"
                new.name, new.type, new.shape = name, old.type, old.shape
                ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        for site in sites:
            tail = [site.add, site.correction]
            if site.correction is not None and site.correction.inputs[1].producer() is not None:
                tail.append(site.correction.inputs[1].producer())  # the offsets' Cast
            for node in [*tail, site.node]:
                if node is None:
                    continue
                old_inputs = list(node.inputs)
                graph.remove(node, safe=True)
                for value in old_inputs:
                    if value is not None and not value.uses() and value.name in graph.initializers:
                        del graph.initializers[value.name]
        logger.debug("packed %s into %s", [node.name for node in siblings], packed.name)

    @staticmethod
    def _add_offsets(graph: ir.Graph, sites: list[_Site], packed: ir.Node, added: list[ir.Node]) -> ir.Value:
        """One ``Add(packed, MatMul(sums, offsets side by side))`` for the affine sites; returns its output."""
        offsets = np.concatenate([site.offsets for site in sites], axis=1)
        table_names = [site.correction.inputs[1].name or "" for site in sites]
        cast_source = sites[0].correction.inputs[1].producer()
        table = add_initializer(graph, merged_name(table_names, "."), offsets)
        if cast_source is not None:  # float16 offsets behind a Cast, as quantize_weights stores them
            cast = ir.node("Cast", [table], attributes={"to": ir.DataType.FLOAT}, name=f"{packed.name}_offset_cast")
            added.append(cast)
            table = cast.outputs[0]
        correction = ir.node("MatMul", [sites[0].sums, table], name=f"{packed.name}_offset")
        total = ir.node("Add", [packed.outputs[0], correction.outputs[0]], name=f"{packed.name}_add")
        added.extend((correction, total))
        for node in added[1:]:
            node_tag(node, RULE)
        graph.insert_after(packed, added[1:])
        total.outputs[0].name = unique_value_name(graph, f"{packed.name}/output_affine")
        total.outputs[0].type = packed.outputs[0].type
        total.outputs[0].shape = packed.outputs[0].shape
        return total.outputs[0]
