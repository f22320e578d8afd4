"""How much each head, MLP channel and decoder layer matters, measured on calibration data.

All three come from one pass over the calibration sequences (``graphopt.capture``: the graph runs
with the needed intermediate values added as outputs, weights not copied):

* a **head**'s contribution is the norm of what it writes into the residual stream, its slice of the
  attention output times its rows of ``o_proj``, relative to the norm of the stream entering the
  layer (so heads of different layers compare), averaged over tokens;
* an **MLP channel** is scored activation-aware: the L2 norm of its activation (the ``down_proj``
  input) over all tokens times the L2 norm of its ``down_proj`` row, i.e. ``|W| x ||x||`` as in
  Wanda, aggregated per output channel;
* a **layer** by how much it changes the stream: ``1 - cos(input, output)``, averaged over tokens.

``random_importance`` gives seeded uniform scores of the same shapes: the control.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from graphopt.capture import capture
from graphopt.passes import _prune_common as common
from graphopt.passes.prune_heads import head_layout
from graphopt.passes.prune_layers import residual_stream

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Importance:
    """Scores per layer: ``heads[l]`` (query heads), ``channels[l]`` (MLP channels), ``layers`` (one each)."""

    heads: list[np.ndarray]
    channels: list[np.ndarray]
    layers: np.ndarray


def _weight(value: ir.Value) -> np.ndarray:
    return value.const_value.numpy().astype(np.float32)


def measured_importance(model_path, model: ir.Model, sequences: list[list[int]]) -> Importance:
    """Scores of ``model`` (loaded from ``model_path``) on the calibration ``sequences``."""
    graph = model.graph
    layers = common.decoder_layers(graph)
    wanted: dict[str, str] = {}
    for layer in layers:
        entering, leaving = residual_stream(layer)
        wanted[f"{layer.index}.in"] = entering.name
        wanted[f"{layer.index}.out"] = leaving.name
        wanted[f"{layer.index}.attn"] = layer.o.node.inputs[0].name
        wanted[f"{layer.index}.mlp"] = layer.down.node.inputs[0].name
    layouts = [head_layout(graph, layer) for layer in layers]
    o_weights = [_weight(layer.o.weight).reshape(heads, head_dim, -1)
                 for layer, (heads, _kv, head_dim) in zip(layers, layouts)]
    down_norms = [np.linalg.norm(_weight(layer.down.weight), axis=1) for layer in layers]

    head_sums = [np.zeros(layout[0]) for layout in layouts]
    channel_squares = [np.zeros(norms.shape[0]) for norms in down_norms]
    layer_sums = np.zeros(len(layers))
    tokens = 0
    names = list(dict.fromkeys(wanted.values()))
    for values in capture(model_path, names, sequences):
        for layer, (heads, _kv, head_dim) in zip(layers, layouts):
            index = layer.index
            entering = values[wanted[f"{index}.in"]].reshape(-1, values[wanted[f"{index}.in"]].shape[-1])
            leaving = values[wanted[f"{index}.out"]].reshape(entering.shape)
            stream_norm = np.linalg.norm(entering, axis=-1) + 1e-6
            attention = values[wanted[f"{index}.attn"]].reshape(-1, heads, head_dim)
            # Each head's write into the residual stream: its output slice times its o_proj rows.
            written = np.einsum("thd,hdo->tho", attention, o_weights[index])
            head_sums[index] += (np.linalg.norm(written, axis=-1) / stream_norm[:, None]).sum(axis=0)
            activation = values[wanted[f"{index}.mlp"]].reshape(-1, down_norms[index].shape[0])
            channel_squares[index] += (activation.astype(np.float64) ** 2).sum(axis=0)
            cosine = (entering * leaving).sum(-1) / (stream_norm * (np.linalg.norm(leaving, axis=-1) + 1e-6))
            layer_sums[index] += (1.0 - cosine).sum()
        tokens += entering.shape[0]
    if tokens == 0:
        raise common.PruneError("no calibration tokens")
    return Importance(heads=[sums / tokens for sums in head_sums],
                      channels=[np.sqrt(squares) * norms for squares, norms in zip(channel_squares, down_norms)],
                      layers=layer_sums / tokens)


def random_importance(model: ir.Model, seed: int) -> Importance:
    """Seeded uniform scores with the shapes ``measured_importance`` would give: the control."""
    graph = model.graph
    layers = common.decoder_layers(graph)
    rng = np.random.default_rng(seed)
    return Importance(heads=[rng.random(head_layout(graph, layer)[0]) for layer in layers],
                      channels=[rng.random(layer.down.weight.shape[0]) for layer in layers],
                      layers=rng.random(len(layers)))
