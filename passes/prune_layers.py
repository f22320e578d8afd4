"""Whole decoder layers: route the residual stream around them  =>  fewer layers, fewer KV-cache tensors.

A dropped layer's output (the residual Add after its MLP) is replaced by its input (the residual
stream entering the layer), its ``past_key_values.N.*`` inputs and ``present.N.*`` outputs are
removed, and the remaining layers are **renumbered** so cache names stay contiguous
(``past_key_values.{0..n-1}`` / ``present.{0..n-1}``, which is how the runtime pairs them) and weight
names stay ``model.layers.{0..n-1}.*`` (so later prune passes find the layers). Nodes that read a
dropped cache input for something other than its layer (the export takes the past length from the
last layer's cache) are pointed at a kept layer's input of the same kind: same batch and past length.
Fused graphs, whose residual Adds live inside ``Skip(Simplified)LayerNormalization`` nodes that also
normalize for the next layer, are handled by moving the next layer's norm parameters onto the
normalization that fed the dropped layer.

Walks the main graph only. In place.
"""

from __future__ import annotations

import logging
import re

import onnx_ir as ir

from graphopt.passes import _prune_common as common

logger = logging.getLogger(__name__)

RULE = "prune_layers"


class PruneLayersPass(common.PrunePass):
    """Drop the decoder layers whose indices are in ``drop`` (indices into the graph's current layers).

    After ``call``, ``counts`` holds ``{"layers_removed": n, "cache_tensors_removed": m}`` and
    ``kept`` the original indices of the remaining layers, in order.
    """

    def __init__(self, drop: list[int]):
        super().__init__()
        self.drop = sorted({int(index) for index in drop})
        self.counts: dict[str, int] = {}
        self.kept: list[int] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        layers = common.decoder_layers(graph)
        self.counts = {"layers_removed": 0, "cache_tensors_removed": 0}
        self.kept = [layer.index for layer in layers if layer.index not in self.drop]
        if any(index >= len(layers) or index < 0 for index in self.drop):
            raise common.PruneError(f"cannot drop layers {self.drop}: the model has layers 0..{len(layers) - 1}")
        if not self.kept:
            raise common.PruneError("cannot drop every decoder layer")
        if not self.drop:
            return ir.passes.PassResult(model, modified=False)
        # Ascending: after bypassing layer l, layer l+1 reads the normalization that fed l.
        for layer in layers:
            if layer.index in self.drop:
                _bypass(layer)
        for index in self.drop:
            for value in common.cache_outputs(graph, index).values():
                graph.outputs.remove(value)
                self.counts["cache_tensors_removed"] += 1
        common.remove_unused(model)
        survivor = self.kept[-1]
        for index in self.drop:
            for kind, value in common.cache_inputs(graph, index).items():
                replacement = common.cache_inputs(graph, survivor)[kind]
                value.replace_all_uses_with(replacement)
                graph.inputs.remove(value)
                self.counts["cache_tensors_removed"] += 1
        _drop_layer_initializers(graph, set(self.drop))
        _renumber(graph, self.kept)
        self.counts["layers_removed"] = len(self.drop)
        return ir.passes.PassResult(model, modified=True)


def residual_stream(layer: common.Layer) -> tuple[ir.Value, ir.Value]:
    """The residual stream entering ``layer`` and leaving it (after its attention and MLP residual sums)."""
    if layer.o is None or layer.down is None:
        raise common.PruneError(f"layer {layer.index}: attention or MLP output projection not found")
    attention_node, attention_arrival = common.residual_node(layer.o.output)
    mlp_node, _ = common.residual_node(layer.down.output)
    fused = attention_node.op_type in common.SKIP_NORMS
    if fused != (mlp_node.op_type in common.SKIP_NORMS):
        raise common.PruneError(f"layer {layer.index}: one residual sum is fused, the other not")
    middle = attention_node.outputs[3] if fused else attention_node.outputs[0]
    if middle not in mlp_node.inputs[:2]:
        raise common.PruneError(f"layer {layer.index}: the MLP residual does not take the attention residual "
                                "(parallel attention/MLP blocks are not supported)")
    entering = [value for value in attention_node.inputs[:2] if value is not attention_arrival]
    if len(entering) != 1:
        raise common.PruneError(f"layer {layer.index}: cannot tell the residual input of {attention_node.name}")
    leaving = mlp_node.outputs[3] if fused else mlp_node.outputs[0]
    if fused and leaving is None:
        raise common.PruneError(f"{mlp_node.name} does not output its residual sum")
    return entering[0], leaving


def _bypass(layer: common.Layer) -> None:
    """Route the residual stream around ``layer``.

    Unfused: the layer's output is replaced by its input. Fused (the residual Adds live inside
    Skip*Normalization nodes, which also normalize for the *next* layer): the normalization that feeds
    this layer takes over the parameters of the one that fed the next layer, so the next layer reads
    ``norm(stream entering this layer)`` with its own scale.
    """
    entering, leaving = residual_stream(layer)
    exit_node, _ = common.residual_node(layer.down.output)
    if exit_node.op_type not in common.SKIP_NORMS:
        leaving.replace_all_uses_with(entering)
        return
    if len(exit_node.inputs) > 4 and exit_node.inputs[4] is not None:
        raise common.PruneError(f"{exit_node.name}: a Skip*Normalization with a bias input is not supported")
    entry_node = _entering_norm(layer)
    parameters = list(exit_node.inputs[2:])
    first = 2 if entry_node.op_type in common.SKIP_NORMS else 1
    if len(entry_node.inputs) - first != len(parameters):
        raise common.PruneError(f"{entry_node.name} and {exit_node.name} take different normalization parameters")
    for offset, parameter in enumerate(parameters):
        entry_node.replace_input_with(first + offset, parameter)
    if "epsilon" in exit_node.attributes:
        entry_node.attributes["epsilon"] = exit_node.attributes["epsilon"]
    exit_node.outputs[0].replace_all_uses_with(entry_node.outputs[0])
    if leaving.uses():
        leaving.replace_all_uses_with(entering)


def _entering_norm(layer: common.Layer) -> ir.Node:
    """The normalization whose output the layer's q/k/v (or c_attn) projections read."""
    value = layer.attention_in[0].node.inputs[0]
    for _ in range(4):
        node = value.producer()
        if node is None:
            break
        if node.op_type.endswith("LayerNormalization"):
            if node.outputs[0] is not value:
                break
            return node
        if node.op_type not in ("Reshape", "Identity"):
            break
        value = node.inputs[0]
    raise common.PruneError(f"layer {layer.index}: no normalization feeds its attention projections")


_CACHE_NAME = re.compile(r"^(past_key_values\.|present\.)(\d+)\.(key|value)$")


def _drop_layer_initializers(graph: ir.Graph, dropped: set[int]) -> None:
    for name in list(graph.initializers):
        match = common.layer_name_pattern().match(name)
        if match and int(match.group(2)) in dropped:
            value = graph.initializers[name]
            if list(value.uses()):
                raise common.PruneError(f"{name} is still used after dropping its layer")
            graph.initializers.pop(name)


def _renumber(graph: ir.Graph, kept: list[int]) -> None:
    """Rename layer ``kept[j]``'s weights and cache tensors to index ``j`` (ascending, so no clashes)."""
    new_index = {old: new for new, old in enumerate(kept)}
    values = list(graph.initializers.values()) + list(graph.inputs) + list(graph.outputs)
    for pattern in (common.layer_name_pattern(), _CACHE_NAME):
        renames = []
        for value in values:
            match = pattern.match(value.name or "")
            if match and new_index[int(match.group(2))] != int(match.group(2)):
                renames.append((int(match.group(2)), value, match))
        for _old, value, match in sorted(renames, key=lambda item: item[0]):
            value.name = f"{match.group(1)}{new_index[int(match.group(2))]}{value.name[match.end(2):]}"
