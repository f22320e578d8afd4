"""Attention heads: slice q/k/v/o weights to the kept heads  =>  fewer heads, smaller KV cache.

Per layer the plan names the query heads to keep. GQA stays valid: the kept query heads must cover
their KV groups evenly (whole groups dropped with their query heads, or the same number of query
heads kept in every group); a KV head is kept when any of its query heads is. The pass slices
``q/k/v`` columns and biases (Llama, Qwen2) or the three sections of GPT-2's fused ``c_attn`` and
the ``o_proj`` / ``c_proj`` rows, then tracks the head axes through the graph (``_prune_common``):
Reshape/Expand constants that spell a head count get new constants, fused attention ops get new
``num_heads`` / ``kv_num_heads`` (``q_num_heads`` for opset-23 Attention), and the KV-cache inputs
and outputs get their new static head dim, which is what the runtime allocates from.

Walks the main graph only. In place.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from graphopt.passes import _prune_common as common

logger = logging.getLogger(__name__)

RULE = "prune_heads"


class PruneHeadsPass(common.PrunePass):
    """Keep ``keep[layer]`` query heads (indices into the graph's current heads) in each listed layer.

    Layers not in ``keep`` are left alone. After ``call``, ``counts`` holds ``{"heads_removed": n,
    "kv_heads_removed": m, "constants_rewritten": k}`` and ``layout`` the per-layer ``(heads, kv_heads)``.
    """

    def __init__(self, keep: dict[int, list[int]]):
        super().__init__()
        self.keep = {int(layer): sorted(int(head) for head in heads) for layer, heads in keep.items()}
        self.counts: dict[str, int] = {}
        self.layout: list[tuple[int, int]] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        layers = self.layers_named(graph, self.keep)
        self.counts = {"heads_removed": 0, "kv_heads_removed": 0, "constants_rewritten": 0}
        self.layout = [head_layout(graph, layer)[:2] for layer in layers]
        modified = False
        for layer in layers:
            if layer.index not in self.keep:
                continue
            heads, kv_heads, head_dim = head_layout(graph, layer)
            kept = self.keep[layer.index]
            kept_kv = _kept_groups(layer.index, kept, heads, kv_heads)
            if len(kept) == heads:
                continue
            self._prune_layer(graph, layer, kept, kept_kv, heads, kv_heads, head_dim)
            self.counts["heads_removed"] += heads - len(kept)
            self.counts["kv_heads_removed"] += kv_heads - len(kept_kv)
            self.layout[layer.index] = (len(kept), len(kept_kv))
            modified = True
        if modified:
            common.remove_unused(model)
        return ir.passes.PassResult(model, modified=modified)

    def _prune_layer(self, graph, layer: common.Layer, kept, kept_kv, heads, kv_heads, head_dim) -> None:
        q_columns = _columns(kept, head_dim)
        kv_columns = _columns(kept_kv, head_dim)
        resizer = common.Resizer(graph, RULE, protected=(head_dim,),
                                 broadcast={heads // kv_heads: len(kept) // len(kept_kv)},
                                 attention=(len(kept), len(kept_kv)), head_dim=head_dim)
        if layer.qkv is not None:  # [q | k | v] columns: heads, kv_heads and kv_heads times head_dim
            q_width, kv_width = heads * head_dim, kv_heads * head_dim
            columns = np.concatenate([q_columns, q_width + kv_columns, q_width + kv_width + kv_columns])
            _slice_linear(graph, layer.qkv, columns)
            parts = _packed_qkv_slices(graph, layer.qkv.output, (q_width, kv_width, kv_width),
                                       (len(q_columns), len(kv_columns), len(kv_columns)))
            if parts is None:
                resizer.seed(layer.qkv.node.outputs[0], {-1: (q_width + 2 * kv_width, len(columns))})
            for value, old, new in parts or ():
                resizer.seed(value, {-1: (old, new)})
        else:
            for linear, columns, count in ((layer.q, q_columns, heads), (layer.k, kv_columns, kv_heads),
                                           (layer.v, kv_columns, kv_heads)):
                _slice_linear(graph, linear, columns)
                resizer.seed(linear.node.outputs[0], {-1: (count * head_dim, len(columns))})
        common.slice_initializer(graph, layer.o.weight, 0, q_columns)
        resizer.stop_at(layer.o.node)
        for value in common.cache_inputs(graph, layer.index).values():
            resizer.seed(value, {1: (kv_heads, len(kept_kv))})
        resizer.run()
        self.counts["constants_rewritten"] += resizer.rewritten
        for value in common.cache_outputs(graph, layer.index).values():
            common.set_cache_dims(value, len(kept_kv))


def _packed_qkv_slices(graph: ir.Graph, packed: ir.Value, old: tuple[int, ...], new: tuple[int, ...]):
    """phi3: ``packed`` read by three constant Slices of its last axis, [q | k | v] in order.

    Their bounds become the pruned widths (fresh constants: the old ones may be shared), and the
    three outputs are returned with their (old, new) widths for the resizer; None when ``packed`` is
    read otherwise (GPT-2's Split, which the resizer handles itself).
    """
    users = list(packed.consumers())
    if len(users) != 3 or any(node.op_type != "Slice" or node.inputs[0] is not packed for node in users):
        return None
    bounds = []
    for node in users:
        arrays = [node.inputs[i].const_value.numpy().reshape(-1) if len(node.inputs) > i and node.inputs[i] is not None
                  and node.inputs[i].const_value is not None else None for i in (1, 2, 3)]
        steps = node.inputs[4].const_value.numpy().reshape(-1).tolist() if len(node.inputs) > 4 \
            and node.inputs[4] is not None and node.inputs[4].const_value is not None else [1]
        if any(array is None or array.size != 1 for array in arrays) or steps != [1] \
                or arrays[2][0] not in (-1, packed.shape.rank() - 1 if packed.shape is not None else -1):
            raise common.PruneError(f"Slice '{node.name}' of the packed q/k/v projection is not a constant slice "
                                    "of its last axis")
        bounds.append((int(arrays[0][0]), int(arrays[1][0]), node))
    bounds.sort(key=lambda entry: entry[0])
    starts = np.cumsum((0, *old))
    if [start for start, _, _ in bounds] != starts[:3].tolist() \
            or [end for _, end, _ in bounds[:2]] != starts[1:3].tolist() or bounds[2][1] < starts[3]:
        raise common.PruneError("the packed q/k/v projection is not read as [q | k | v] by three Slices")
    new_starts = np.cumsum((0, *new))
    parts = []
    for index, (_start, _end, node) in enumerate(bounds):
        for position, bound in ((1, new_starts[index]), (2, new_starts[index + 1])):
            node.replace_input_with(position, common._constant(graph, np.array([bound], dtype=np.int64),
                                                               f"{node.name}.pruned_bounds"))
        parts.append((node.outputs[0], old[index], new[index]))
    if packed.shape is not None:
        common._set_dims(packed, {packed.shape.rank() - 1: (sum(old), sum(new))})
    return parts


def head_layout(graph: ir.Graph, layer: common.Layer) -> tuple[int, int, int]:
    """``(heads, kv_heads, head_dim)`` of a layer, from its KV-cache input and query weight."""
    cache = common.cache_inputs(graph, layer.index).get("key")
    if cache is None or cache.shape is None or not all(isinstance(cache.shape[axis], int) for axis in (1, 3)):
        raise common.PruneError(f"layer {layer.index}: no KV-cache input with static (kv_heads, head_dim)")
    kv_heads, head_dim = cache.shape[1], cache.shape[3]
    if layer.qkv is not None:
        heads = layer.qkv.weight.shape[1] // head_dim - 2 * kv_heads
    else:
        heads = layer.q.weight.shape[1] // head_dim
    return heads, kv_heads, head_dim


def _kept_groups(index: int, kept: list[int], heads: int, kv_heads: int) -> list[int]:
    if not kept:
        raise common.PruneError(f"layer {index}: keep at least one head (drop the layer with --layers instead)")
    if kept[-1] >= heads or kept[0] < 0 or len(set(kept)) != len(kept):
        raise common.PruneError(f"layer {index}: head indices {kept} are not distinct heads of 0..{heads - 1}")
    group = heads // kv_heads
    per_group: dict[int, int] = {}
    for head in kept:
        per_group[head // group] = per_group.get(head // group, 0) + 1
    if len(set(per_group.values())) != 1:
        raise common.PruneError(f"layer {index}: kept heads {kept} leave KV groups with unequal numbers of query "
                                f"heads {sorted(per_group.values())}; GQA needs the same number in every group")
    return sorted(per_group)


def _columns(heads: list[int], head_dim: int) -> np.ndarray:
    return np.concatenate([np.arange(head * head_dim, (head + 1) * head_dim) for head in heads]).astype(np.int64)


def _slice_linear(graph: ir.Graph, linear: common.Linear, columns: np.ndarray) -> None:
    common.slice_initializer(graph, linear.weight, 1, columns)
    if linear.bias is not None:
        common.slice_initializer(graph, linear.bias, 0, columns)
