"""MLP channels: gate/up columns and the matching down rows  =>  a narrower intermediate layer.

Per layer the plan names the intermediate channels to keep. Llama/Qwen2: ``gate_proj`` and
``up_proj`` columns, ``down_proj`` rows; phi3: those channels in both halves of ``gate_up_proj``; GPT-2: ``c_fc`` columns and bias, ``mlp.c_proj`` rows.
Constants that spell the intermediate size between them (GPT-2's Reshape targets around the Gemms)
are rewritten through the axis tracking of ``_prune_common``.

Walks the main graph only. In place.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from graphopt.passes import _prune_common as common

logger = logging.getLogger(__name__)

RULE = "prune_channels"


class PruneChannelsPass(common.PrunePass):
    """Keep ``keep[layer]`` intermediate channels (indices into the current ones) in each listed layer.

    After ``call``, ``counts`` holds ``{"channels_removed": n, "constants_rewritten": k}`` and
    ``sizes`` the per-layer intermediate sizes.
    """

    def __init__(self, keep: dict[int, list[int]]):
        super().__init__()
        self.keep = {int(layer): sorted(int(channel) for channel in channels) for layer, channels in keep.items()}
        self.counts: dict[str, int] = {}
        self.sizes: list[int] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        layers = self.layers_named(graph, self.keep)
        self.counts = {"channels_removed": 0, "constants_rewritten": 0}
        self.sizes = [intermediate_size(layer) for layer in layers]
        modified = False
        for layer in layers:
            if layer.index not in self.keep:
                continue
            size = self.sizes[layer.index]
            kept = np.asarray(self.keep[layer.index], dtype=np.int64)
            if kept.size == 0:
                raise common.PruneError(f"layer {layer.index}: keep at least one MLP channel")
            if kept[-1] >= size or kept[0] < 0 or len(set(kept.tolist())) != kept.size:
                raise common.PruneError(f"layer {layer.index}: channel indices are not distinct channels of "
                                        f"0..{size - 1}")
            if kept.size == size:
                continue
            resizer = common.Resizer(graph, RULE)
            for linear in layer.mlp_in:
                # phi3's packed [gate | up]: the same channels in both halves; its Split halves the new width.
                packed = linear is layer.gate_up
                columns = np.concatenate([kept, size + kept]) if packed else kept
                common.slice_initializer(graph, linear.weight, 1, columns)
                if linear.bias is not None:
                    common.slice_initializer(graph, linear.bias, 0, columns)
                resizer.seed(linear.node.outputs[0], {-1: (size * (1 + packed), columns.size)})
            common.slice_initializer(graph, layer.down.weight, 0, kept)
            resizer.stop_at(layer.down.node)
            resizer.run()
            self.counts["channels_removed"] += size - kept.size
            self.counts["constants_rewritten"] += resizer.rewritten
            self.sizes[layer.index] = int(kept.size)
            modified = True
        if modified:
            common.remove_unused(model)
        return ir.passes.PassResult(model, modified=modified)


def intermediate_size(layer: common.Layer) -> int:
    if layer.down is None or not layer.mlp_in:
        raise common.PruneError(f"layer {layer.index}: no MLP projections found")
    return int(layer.down.weight.shape[0])
