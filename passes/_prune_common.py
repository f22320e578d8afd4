"""Shared by the ``prune_*`` passes: where a decoder layer's parts are, and resizing an axis through a graph.

Structured pruning changes the size of one axis of a few tensors (query heads, KV heads, MLP
channels). Weights are sliced by name; everything downstream follows by *axis tracking*: starting
from the sliced projections' outputs (and the shrunk KV-cache inputs) every value records which of
its axes changed size, ``{axis: (old, new)}``, through elementwise ops, Transpose, Reshape, Expand,
Unsqueeze, Split, Concat, MatMul and the fused attention ops, until a projection whose weight rows
were sliced contracts the axis away. Reshape/Expand targets that spell a changed size as a constant
get a new constant (never edited in place: the export shares shape constants between layers and
between unrelated Reshapes), and static dims of value shapes are rewritten so shape-based passes
(fusion) and the runtime (cache shapes from the graph inputs) see the pruned sizes.

Only the main graph is walked (the exported decoders have no subgraphs or functions).
"""

from __future__ import annotations

import dataclasses
import fractions
import logging
import math
import re

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from graphopt.errors import GraphoptError
from graphopt.ir import node_tag
from graphopt.models import WeightNames
from graphopt.models import weight_names as family_weight_names

logger = logging.getLogger(__name__)

Changes = dict[int, tuple[int, int]]

_ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Sigmoid", "Tanh", "Pow", "Softmax", "Cast", "Where", "Sqrt", "Relu",
    "Erf", "Gelu", "FastGelu", "QuickGelu", "Exp", "Abs", "Identity", "Reciprocal", "Max", "Min", "Clip",
})
# Normalizations over the axes from ``axis`` (default -1) on: elementwise on the others.
_NORMS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"})
FUSED_ATTENTION = frozenset({"GroupQueryAttention", "MultiHeadAttention", "Attention"})
QUANTIZED_OPS = frozenset({"DequantizeLinear", "MatMulNBits", "QLinearMatMul", "MatMulInteger", "DynamicQuantizeLinear",
                           "QuantizeLinear", "GatherBlockQuantized"})

# The packed q|k|v weight that attention fusion (--pack-qkv) makes per layer: qkv_proj.{i}.weight.
PACKED_QKV = WeightNames("qkv_proj", {"": "qkv"})


def weight_names() -> tuple[WeightNames, ...]:
    """The names the export keeps (every family's, see graphopt.models) and fusion's packed q|k|v."""
    return (*family_weight_names(), PACKED_QKV)


def layer_name_pattern() -> re.Pattern:
    """Any name inside a decoder layer: group 1 is the prefix up to the index, group 2 the index."""
    prefixes = "|".join(re.escape(names.layers + ".") for names in weight_names())
    return re.compile(rf"^({prefixes})(\d+)\.")


class PruneError(GraphoptError):
    """The graph cannot be pruned as asked (unsupported op on a pruned axis, quantized weights...)."""


class PrunePreconditionError(PruneError, ir.passes.PreconditionError):
    """Raised from a prune pass's ``requires()``: still a GraphoptError, so the CLI prints one line."""


class PrunePostconditionError(PruneError, ir.passes.PostconditionError):
    """Raised from a prune pass's ``ensures()``."""


class PrunePass(ir.passes.InPlacePass):
    """Base of the pruning passes: float graphs in, the KV-cache contract kept on the way out."""

    def requires(self, model: ir.Model) -> None:
        refuse_quantized(model.graph)

    def ensures(self, model: ir.Model) -> None:
        check_cache_contract(model.graph)

    @staticmethod
    def layers_named(graph: ir.Graph, keep: dict[int, list[int]]) -> list["Layer"]:
        """The graph's decoder layers, once every layer ``keep`` names is known to exist."""
        layers = decoder_layers(graph)
        unknown = sorted(set(keep) - {layer.index for layer in layers})
        if unknown:
            raise PruneError(f"no decoder layer {unknown[0]} (the model has {len(layers)})")
        return layers


# ---------------------------------------------------------------------------------------------
# Where things are


@dataclasses.dataclass
class Linear:
    """A projection: the node that multiplies by an initializer weight (in, out), and its bias if any."""

    node: ir.Node
    weight: ir.Value
    bias: ir.Value | None
    output: ir.Value  # after the bias when the bias is a separate Add


@dataclasses.dataclass
class Layer:
    """One decoder layer's projections, found by the checkpoint names the export keeps."""

    index: int
    q: Linear | None = None  # Llama family
    k: Linear | None = None
    v: Linear | None = None
    qkv: Linear | None = None  # [q | k | v] columns: GPT-2's c_attn, or packed by attention fusion
    o: Linear | None = None
    gate: Linear | None = None
    up: Linear | None = None  # Llama up_proj, GPT-2 c_fc
    gate_up: Linear | None = None  # phi3's gate_up_proj: [gate | up] columns
    down: Linear | None = None  # Llama down_proj, GPT-2 mlp.c_proj

    @property
    def attention_in(self) -> list[Linear]:
        return [linear for linear in (self.q, self.k, self.v, self.qkv) if linear is not None]

    @property
    def mlp_in(self) -> list[Linear]:
        return [linear for linear in (self.gate, self.up, self.gate_up) if linear is not None]


def layer_of(name: str) -> int | None:
    """The decoder layer an initializer belongs to, from its checkpoint name, else None."""
    match = layer_name_pattern().match(name)
    return int(match.group(2)) if match else None


def refuse_quantized(graph: ir.Graph) -> None:
    found = sorted({node.op_type for node in graph if node.op_type in QUANTIZED_OPS})
    if found:
        raise PrunePreconditionError(f"the graph is quantized ({', '.join(found)}); prune before quantizing "
                         "(prune the float model, then quantize the pruned one)")


def _linear(graph: ir.Graph, weight: ir.Value) -> Linear:
    consumers = [node for node in weight.consumers()]
    if len(consumers) != 1 or consumers[0].op_type not in ("MatMul", "Gemm"):
        ops = ", ".join(node.op_type for node in consumers) or "nothing"
        raise PruneError(f"weight {weight.name} feeds {ops}, expected one MatMul/Gemm")
    node = consumers[0]
    if node.inputs[1] is not weight:
        raise PruneError(f"weight {weight.name} is not the right operand of {node.name}")
    if node.op_type == "Gemm":
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        if attrs.get("transA", 0) or attrs.get("transB", 0):
            raise PruneError(f"{node.name}: transposed Gemm operands are not supported")
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        return Linear(node, weight, bias, node.outputs[0])
    output = node.outputs[0]
    # A bias the export writes as a separate Add of an initializer named like the weight.
    users = list(output.consumers())
    bias = None
    if len(users) == 1 and users[0].op_type == "Add":
        other = [value for value in users[0].inputs if value is not output]
        if other and other[0] is not None and other[0].is_initializer() and other[0].name.endswith(".bias"):
            bias, output = other[0], users[0].outputs[0]
    return Linear(node, weight, bias, output)


def decoder_layers(graph: ir.Graph) -> list[Layer]:
    """The decoder layers in order, with their projections (by the checkpoint's weight names)."""
    refuse_quantized(graph)
    layers: dict[int, Layer] = {}
    for name, value in graph.initializers.items():
        if not name.endswith(".weight"):
            continue
        for names in weight_names():
            match = names.layer_pattern.match(name)
            if match:
                role = names.roles.get(name[match.end():-len(".weight")].rstrip("."))
                if role:
                    layer = layers.setdefault(int(match.group(1)), Layer(int(match.group(1))))
                    setattr(layer, role, _linear(graph, value))
    if not layers:
        raise PruneError("no decoder layer weights found (expected model.layers.N.* or transformer.h.N.* names)")
    ordered = [layers[index] for index in sorted(layers)]
    if [layer.index for layer in ordered] != list(range(len(ordered))):
        raise PruneError(f"decoder layers are not numbered 0..{len(ordered) - 1}: {[l.index for l in ordered]}")
    return ordered


def cache_inputs(graph: ir.Graph, layer: int) -> dict[str, ir.Value]:
    names = {f"past_key_values.{layer}.key": "key", f"past_key_values.{layer}.value": "value"}
    return {names[value.name]: value for value in graph.inputs if value.name in names}


def cache_outputs(graph: ir.Graph, layer: int) -> dict[str, ir.Value]:
    names = {f"present.{layer}.key": "key", f"present.{layer}.value": "value"}
    return {names[value.name]: value for value in graph.outputs if value.name in names}


SKIP_NORMS = frozenset({"SkipSimplifiedLayerNormalization", "SkipLayerNormalization"})


def residual_node(start: ir.Value) -> tuple[ir.Node, ir.Value]:
    """The residual Add (or fused Skip*Normalization) a projection's output reaches through single-use
    Reshapes, and the input of that node the projection arrives on."""
    value = start
    for _ in range(4):
        users = list(value.consumers())
        normed = _written_out_rms_norm(value, users)
        if normed is not None:  # Gemma 3's post-attention / post-MLP norm before the residual sum
            value = normed
            continue
        if len(users) != 1:
            break
        if users[0].op_type == "Add" or users[0].op_type in SKIP_NORMS:
            return users[0], value
        if users[0].op_type not in ("Reshape", "Identity"):
            break
        value = users[0].outputs[0]
    raise PruneError(f"{start.name}: no residual Add after the projection")


def _written_out_rms_norm(value: ir.Value, users: list[ir.Node]) -> ir.Value | None:
    """``w * (x * Reciprocal(Sqrt(ReduceMean(Pow(x)) + eps)))`` of ``x = value`` as the export writes it: its output."""
    if sorted(node.op_type for node in users) != ["Mul", "Pow"]:
        return None
    scaled = next(node for node in users if node.op_type == "Mul")
    rsqrt = [v.producer() for v in scaled.inputs if v is not value and v is not None and v.producer() is not None]
    if len(rsqrt) != 1 or rsqrt[0].op_type != "Reciprocal":
        return None
    weighted = list(scaled.outputs[0].consumers())
    if len(weighted) != 1 or weighted[0].op_type != "Mul" \
            or not any(v is not None and v.const_value is not None for v in weighted[0].inputs):
        return None
    return weighted[0].outputs[0]


# ---------------------------------------------------------------------------------------------
# Slicing weights


def slice_initializer(graph: ir.Graph, value: ir.Value, axis: int, keep: np.ndarray) -> None:
    """Replace ``value``'s contents with the entries ``keep`` along ``axis`` (the value object stays)."""
    if len(list(value.consumers())) != 1:
        raise PruneError(f"initializer {value.name} is shared by several nodes; cannot slice it for one")
    array = value.const_value.numpy()
    sliced = np.ascontiguousarray(np.take(array, keep, axis=axis))
    value.const_value = ir.tensor(sliced, name=value.name)
    value.shape = ir.Shape(sliced.shape)


# ---------------------------------------------------------------------------------------------
# Axis tracking


def _rank(value: ir.Value) -> int | None:
    if value.shape is not None:
        return value.shape.rank()
    producer = value.producer()
    # A projection's output has its input's rank even where no pass annotated its shape.
    if producer is not None and producer.op_type == "MatMul" and producer.inputs[1].const_value is not None:
        return _rank(producer.inputs[0])
    return None


def _static(value: ir.Value, axis: int) -> int | None:
    if value.shape is None:
        return None
    dim = value.shape[axis]
    return dim if isinstance(dim, int) else None


def _normalize(changes: Changes, rank: int) -> Changes:
    return {axis % rank: sizes for axis, sizes in changes.items()}


class Resizer:
    """Propagate axis size changes from seed values through the graph, rewriting what encodes them.

    Args:
        graph: the main graph, edited in place.
        rule: the name recorded on new nodes.
        protected: sizes that never change in this pruning (e.g. head_dim), used to tell a head
            count from head_dim in a Reshape target when both are constants.
        broadcast: new size for an Expand that broadcasts a size-1 axis to ``old`` (GQA's repeat
            of KV heads: ``{old_repeat: new_repeat}``).
        attention: new ``(heads, kv_heads)`` for fused attention ops reached by the changes.
        head_dim: the (unchanged) head size, to resize fused attention outputs that carry no shape.
    """

    def __init__(self, graph: ir.Graph, rule: str, protected: tuple[int, ...] = (),
                 broadcast: dict[int, int] | None = None, attention: tuple[int, int] | None = None,
                 head_dim: int | None = None):
        self.graph = graph
        self.rule = rule
        self.protected = protected
        self.broadcast = broadcast or {}
        self.attention = attention
        self.head_dim = head_dim
        self.changes: dict[ir.Value, Changes] = {}
        self.stops: set[ir.Node] = set()
        self._old_heads: dict[ir.Node, int | None] = {}
        self.rewritten = 0

    def seed(self, value: ir.Value, changes: Changes) -> None:
        rank = _rank(value)
        if rank is None:
            raise PruneError(f"{value.name} has no known rank; cannot track the pruned axis")
        # A seed whose sizes stay is still followed: GQA's repeat count can change without the KV heads.
        self.changes[value] = _normalize({axis: sizes for axis, sizes in changes.items() if sizes[0] != sizes[1]}, rank)

    def stop_at(self, node: ir.Node) -> None:
        """A node whose weight rows were sliced: the changed axis is contracted here."""
        self.stops.add(node)

    def run(self) -> None:
        for node in list(self.graph):
            if not any(value in self.changes for value in node.inputs if value is not None):
                continue
            if node in self.stops:
                continue
            self._visit(node)
        for value, changes in self.changes.items():
            _set_dims(value, changes)

    # One method per op family; each records the output changes.
    _HANDLERS = {**{op: "_elementwise" for op in (*_ELEMENTWISE, *_NORMS)}, "ReduceMean": "_reduce",
                 "ReduceSum": "_reduce", "Transpose": "_transpose", "Reshape": "_reshape", "Expand": "_expand",
                 "Unsqueeze": "_unsqueeze", **{op: "_along_axis" for op in ("Slice", "Concat", "Split", "Gather")},
                 "MatMul": "_matmul", "Shape": "_shape", "RotaryEmbedding": "_rotary",
                 **{op: "_fused_attention" for op in FUSED_ATTENTION}}

    def _visit(self, node: ir.Node) -> None:
        handler = self._HANDLERS.get(node.op_type)
        if handler is None:
            raise PruneError(f"cannot prune through {node.op_type} node '{node.name}' (a pruned axis reaches it)")
        getattr(self, handler)(node)

    def _transpose(self, node: ir.Node) -> None:
        perm = node.attributes["perm"].value
        source = self.changes.get(node.inputs[0], {})
        self._set(node.outputs[0], {new: source[old] for new, old in enumerate(perm) if old in source})

    def _set(self, value: ir.Value, changes: Changes) -> None:
        self.changes[value] = changes

    def _elementwise(self, node: ir.Node) -> None:
        output = node.outputs[0]
        rank = _rank(output) or max(_rank(value) or 0 for value in node.inputs if value is not None)
        merged: Changes = {}
        for value in node.inputs:
            if value is None:
                continue
            offset = rank - (_rank(value) or rank)
            for axis, sizes in self.changes.get(value, {}).items():
                merged[axis + offset] = sizes
        for value in node.inputs:
            if value is None or value in self.changes or value.const_value is None:
                continue
            offset = rank - value.const_value.shape.rank()
            for axis, (old, _new) in merged.items():
                local = axis - offset
                if 0 <= local < value.const_value.shape.rank() and value.const_value.shape[local] == old != 1:
                    raise PruneError(f"constant {value.name} of {node.op_type} '{node.name}' spans the pruned axis "
                                     f"(size {old}); slice it with its weight")
        if node.op_type in _NORMS:
            first = node.attributes.get_int("axis", -1) % rank
            if any(axis >= first for axis in merged):
                raise PruneError(f"{node.op_type} '{node.name}' normalizes over a pruned axis")
        self._set(output, merged)

    def _reduce(self, node: ir.Node) -> None:
        """A reduction over other axes than the pruned one (Qwen3's per-head norm: over head_dim)."""
        source = self.changes.get(node.inputs[0], {})
        rank = _rank(node.inputs[0])
        axes_value = node.inputs[1] if len(node.inputs) > 1 else None
        if rank is None or axes_value is None or axes_value.const_value is None:
            raise PruneError(f"{node.op_type} '{node.name}' has no constant axes or known rank")
        axes = {int(axis) % rank for axis in axes_value.const_value.numpy().reshape(-1)}
        if axes & set(source):
            raise PruneError(f"{node.op_type} '{node.name}' reduces over a pruned axis")
        if node.attributes.get_int("keepdims", 1):
            self._set(node.outputs[0], dict(source))
        else:
            kept = [axis for axis in range(rank) if axis not in axes]
            self._set(node.outputs[0], {kept.index(axis): sizes for axis, sizes in source.items()})

    def _target(self, value: ir.Value) -> tuple[list[int | None], ir.Node | None]:
        """A Reshape/Expand shape input as entries (None where computed at run time) and its Concat."""
        if value.const_value is not None:
            return [int(x) for x in value.const_value.numpy().reshape(-1)], None
        node = value.producer()
        if node is None or node.op_type != "Concat":
            raise PruneError(f"shape {value.name} is computed by {node.op_type if node else 'nothing'}; "
                             "only constant or Concat-of-pieces targets can be rewritten")
        entries: list[int | None] = []
        for piece in node.inputs:
            if piece.const_value is not None:
                entries.extend(int(x) for x in piece.const_value.numpy().reshape(-1))
            elif piece.shape is not None and piece.shape.rank() == 1 and piece.shape[0] == 1:
                entries.append(None)
            else:
                raise PruneError(f"shape piece {piece.name} of {node.name} has no known length")
        return entries, node

    def _new_target(self, node: ir.Node, index: int, old_entries: list[int | None], new_entries: dict[int, int]) -> None:
        """Give ``node`` a fresh shape input with ``new_entries`` changed (shared constants stay)."""
        value = node.inputs[index]
        entries, concat = self._target(value)
        if concat is None:
            array = np.array([new_entries.get(i, entry) for i, entry in enumerate(entries)], dtype=np.int64)
            replacement = _constant(self.graph, array, f"{value.name}_pruned")
        else:
            pieces, position = [], 0
            for piece in concat.inputs:
                length = 1 if piece.const_value is None else piece.const_value.size
                if piece.const_value is not None and any(position + i in new_entries for i in range(length)):
                    old = piece.const_value.numpy().reshape(-1)
                    array = np.array([new_entries.get(position + i, int(old[i])) for i in range(length)], dtype=np.int64)
                    piece = _constant(self.graph, array, f"{piece.name}_pruned")
                pieces.append(piece)
                position += length
            new_concat = ir.node("Concat", pieces, attributes={"axis": 0})
            new_concat.outputs[0].shape = ir.Shape([len(entries)])
            new_concat.outputs[0].type = value.type
            node_tag(new_concat, self.rule)
            self.graph.insert_before(node, new_concat)  # the graph names the new value uniquely
            replacement = new_concat.outputs[0]
        node.replace_input_with(index, replacement)
        self.rewritten += 1

    def _reshape(self, node: ir.Node) -> None:
        source = self.changes.get(node.inputs[0], {})
        factor = fractions.Fraction(math.prod(new for _, new in source.values()),
                                    math.prod(old for old, _ in source.values()))
        if factor == 1:
            self._set(node.outputs[0], {})
            return
        entries, _ = self._target(node.inputs[1])
        candidates = [i for i, entry in enumerate(entries)
                      if entry is not None and entry > 1 and (entry * factor).denominator == 1]
        if len(candidates) > 1:
            candidates = [i for i in candidates if entries[i] not in self.protected] or candidates
        if len(candidates) != 1:
            raise PruneError(f"Reshape '{node.name}' target {entries}: cannot tell which entry carries the pruned "
                             f"axis (size x{factor})")
        axis = candidates[0]
        old = entries[axis]
        new = int(old * factor)
        self._new_target(node, 1, entries, {axis: new})
        self._set(node.outputs[0], {axis: (old, new)})

    def _expand(self, node: ir.Node) -> None:
        data = node.inputs[0]
        source = self.changes.get(data, {})
        entries, _ = self._target(node.inputs[1])
        rank = len(entries)
        offset = rank - (_rank(data) or rank)
        output: Changes = {}
        new_entries: dict[int, int] = {}
        for axis, entry in enumerate(entries):
            local = axis - offset
            if local in source:
                output[axis] = source[local]
                if entry == source[local][0]:
                    new_entries[axis] = source[local][1]
            elif local >= 0 and _static(data, local) == 1 and entry in self.broadcast and entry is not None:
                new = self.broadcast[entry]
                if new != entry:
                    output[axis] = (entry, new)
                    new_entries[axis] = new
        if new_entries:
            self._new_target(node, 1, entries, new_entries)
        self._set(node.outputs[0], output)

    def _unsqueeze(self, node: ir.Node) -> None:
        source = self.changes.get(node.inputs[0], {})
        axes_value = node.inputs[1] if len(node.inputs) > 1 else None
        if axes_value is None or axes_value.const_value is None:
            raise PruneError(f"Unsqueeze '{node.name}' has no constant axes")
        rank = (_rank(node.inputs[0]) or 0) + axes_value.const_value.size
        axes = sorted(int(a) % rank for a in axes_value.const_value.numpy().reshape(-1))
        kept = [axis for axis in range(rank) if axis not in axes]
        self._set(node.outputs[0], {kept[local]: sizes for local, sizes in source.items()})

    def _along_axis(self, node: ir.Node) -> None:
        op = node.op_type
        data_inputs = node.inputs if op == "Concat" else node.inputs[:1]
        rank = next((_rank(value) for value in data_inputs if value is not None and _rank(value)), None)
        axis = node.attributes["axis"].value if "axis" in node.attributes else 0
        if op == "Slice":
            axes = node.inputs[3].const_value.numpy().reshape(-1) if len(node.inputs) > 3 and node.inputs[3] else None
            if axes is None:
                raise PruneError(f"Slice '{node.name}' on a pruned tensor needs constant axes")
            touched = {int(a) % rank for a in axes}
        else:
            touched = {axis % rank} if rank else set()
        source = {}
        for value in data_inputs:
            if value is not None and value in self.changes:
                source.update(self.changes[value])
        if op == "Gather":
            if axis % rank in source:
                raise PruneError(f"Gather '{node.name}' indexes a pruned axis")
            self._set(node.outputs[0], source)
            return
        if op == "Split" and touched & set(source):
            (old, new), = [source[a] for a in touched]
            parts = len(node.outputs)
            if len(node.inputs) > 1 and node.inputs[1] is not None:
                raise PruneError(f"Split '{node.name}' with explicit sizes over a pruned axis")
            if old % parts or new % parts:
                raise PruneError(f"Split '{node.name}': pruned size {new} does not split in {parts}")
            for output in node.outputs:
                self._set(output, {**source, axis % rank: (old // parts, new // parts)})
            return
        if touched & set(source):
            raise PruneError(f"{op} '{node.name}' cuts along a pruned axis")
        for output in node.outputs:
            self._set(output, source)

    def _matmul(self, node: ir.Node) -> None:
        left, right = node.inputs
        if right.const_value is not None and right in self.changes:
            return
        left_changes = self.changes.get(left, {})
        right_changes = self.changes.get(right, {})
        left_rank, right_rank = _rank(left), _rank(right)
        if left_rank is None or right_rank is None:
            raise PruneError(f"MatMul '{node.name}' on pruned tensors of unknown rank")
        if right.const_value is not None and (left_rank - 1) in left_changes:
            raise PruneError(f"MatMul '{node.name}' contracts a pruned axis with an unsliced weight {right.name}")
        rank = max(left_rank, right_rank)
        output: Changes = {}
        for axis, sizes in left_changes.items():
            if axis < left_rank - 2:
                output[axis + rank - left_rank] = sizes
            elif axis == left_rank - 2:
                output[rank - 2] = sizes
        for axis, sizes in right_changes.items():
            if axis < right_rank - 2:
                output[axis + rank - right_rank] = sizes
            elif axis == right_rank - 1:
                output[rank - 1] = sizes
        self._set(node.outputs[0], output)

    def _shape(self, node: ir.Node) -> None:
        source = self.changes.get(node.inputs[0], {})
        rank = _rank(node.inputs[0])
        start = node.attributes["start"].value if "start" in node.attributes else 0
        end = node.attributes["end"].value if "end" in node.attributes else rank
        if any(axis in range(start % rank if start < 0 else start, end % rank if end < 0 else min(end, rank))
               for axis in source):
            raise PruneError(f"Shape '{node.name}' reads a pruned axis; its value would change at run time")

    def _rotary(self, node: ir.Node) -> None:
        """RotaryEmbedding (opset 23 or contrib) keeps its input's shape; ``num_heads`` names the head count."""
        source = self.changes.get(node.inputs[0], {})
        rank = _rank(node.inputs[0])
        if source and "num_heads" in node.attributes:
            # 4-D input (batch, heads, seq, head_dim) or 3-D (batch, seq, heads * head_dim).
            axis = 1 if rank == 4 else rank - 1
            if axis in source:
                old, new = source[axis]
                heads = node.attributes["num_heads"].value
                node.attributes["num_heads"] = ir.AttrInt64("num_heads", heads * new // old)
                self.rewritten += 1
        self._set(node.outputs[0], dict(source))

    def _fused_attention(self, node: ir.Node) -> None:
        if self.attention is None:
            raise PruneError(f"{node.op_type} '{node.name}' reached without a new head count")
        heads, kv_heads = self.attention
        attribute = "q_num_heads" if node.op_type == "Attention" else "num_heads"
        self._old_heads[node] = node.attributes[attribute].value if attribute in node.attributes else None
        if node.op_type == "GroupQueryAttention":
            node.attributes["num_heads"] = ir.AttrInt64("num_heads", heads)
            node.attributes["kv_num_heads"] = ir.AttrInt64("kv_num_heads", kv_heads)
        elif node.op_type == "MultiHeadAttention":
            if heads != kv_heads:
                raise PruneError(f"MultiHeadAttention '{node.name}' needs equal query and KV heads")
            node.attributes["num_heads"] = ir.AttrInt64("num_heads", heads)
        else:
            node.attributes["q_num_heads"] = ir.AttrInt64("q_num_heads", heads)
            node.attributes["kv_num_heads"] = ir.AttrInt64("kv_num_heads", kv_heads)
        # The output is (batch, seq, heads * head_dim), or (batch, heads, seq, head_dim) for a 4-D
        # opset-23 query; a packed QKV query (GroupQueryAttention without key/value) has neither shape.
        output = node.outputs[0]
        rank = _rank(output) or (_rank(node.inputs[0]) if node.op_type == "Attention" else 3)
        old_heads = self._old_heads.get(node) or (_static(output, 1) if rank == 4 else None)
        if not old_heads or self.head_dim is None:
            raise PruneError(f"{node.op_type} '{node.name}': no head count to resize its output from")
        if rank == 4:
            self._set(output, {1: (old_heads, heads)})
        else:
            self._set(output, {rank - 1: (old_heads * self.head_dim, heads * self.head_dim)})
        # present key/value: (batch, kv_heads, total, head_dim) for all three ops.
        for output in node.outputs[1:3]:
            if output is not None and _static(output, 1) is not None:
                self._set(output, {1: (_static(output, 1), kv_heads)})
        self.rewritten += 1


def _set_dims(value: ir.Value, changes: Changes) -> None:
    if value.shape is None:
        return
    dims = list(value.shape.dims)
    for axis, (old, new) in changes.items():
        if axis < len(dims) and isinstance(dims[axis], int):
            dims[axis] = new
    value.shape = ir.Shape(dims)


def _fresh_name(graph: ir.Graph, base: str) -> str:
    taken = set(graph.initializers)
    name, counter = base, 0
    while name in taken:
        counter += 1
        name = f"{base}_{counter}"
    return name


def _constant(graph: ir.Graph, array: np.ndarray, name: str) -> ir.Value:
    name = _fresh_name(graph, name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.INT64),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def remove_unused(model: ir.Model) -> None:
    ir.passes.common.RemoveUnusedNodesPass()(model)


def check_cache_contract(graph: ir.Graph) -> None:
    """Postcondition of every prune pass: ``past_key_values.{0..n-1}`` pair with ``present.{0..n-1}`` by name
    and agree on their static (kv_heads, head_dim)."""
    past = {value.name[len("past_key_values."):]: value for value in graph.inputs
            if value.name.startswith("past_key_values.")}
    present = {value.name[len("present."):]: value for value in graph.outputs if value.name.startswith("present.")}
    layers = len(past) // 2
    expected = {f"{index}.{kind}" for index in range(layers) for kind in ("key", "value")}
    if set(past) != expected or set(present) != expected:
        raise PrunePostconditionError(f"KV-cache names are not contiguous after pruning: {sorted(past)} / {sorted(present)}")
    for name, value in past.items():
        for axis in (1, 3):
            if value.shape[axis] != present[name].shape[axis]:
                raise PrunePostconditionError(f"past_key_values.{name} and present.{name} disagree on axis {axis}: "
                                 f"{value.shape} vs {present[name].shape}")


def set_cache_dims(value: ir.Value, kv_heads: int) -> None:
    dims = list(value.shape.dims)
    dims[1] = kv_heads
    value.shape = ir.Shape(dims)
