"""Structured pruning of a model directory: choose what to remove, run the prune passes, write the result.

Importance is measured once on the unpruned model (``graphopt.importance``), then a plan is made:

* heads: ``heads`` is the fraction of query heads to remove; the unit is a whole KV group with its
  query heads (a single head when every head has its own KV head, as in GPT-2), so the KV cache
  shrinks too. Groups are ranked across all layers by their relative contribution to the residual
  stream, and every layer keeps at least one group;
* channels: ``channels`` is the fraction of each layer's MLP channels to remove (the same fraction
  in every layer, kept counts rounded to a multiple of 8 for the matmul kernels), the lowest scores
  go;
* layers: ``layers`` is the number of decoder layers to drop, lowest ``1 - cos`` first;
* ``params``: a fraction of all parameters (embeddings included) to remove, reached with a ``split``
  of the three (see ``SPLITS``); the default is the split that kept perplexity lowest on SmolLM2
  (tools/bench_prune.py).

The passes run in the order heads, channels, layers: the plan indexes the unpruned layers, and
dropping layers renumbers them. Unfused and fused (``graphopt fuse``) float graphs are supported;
quantized graphs are refused: prune first, then quantize.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import time
from typing import Callable

import numpy as np
import onnx_ir as ir

from graphopt import ir as graph_ir
from graphopt.calibration import CalibrationSpec, calibration_sequences
from graphopt.errors import GraphoptError
from graphopt.importance import Importance, measured_importance, random_importance
from graphopt.modeldir import ModelDir, atomic_output, derive
from graphopt.passes import _prune_common as common
from graphopt.passes.prune_channels import PruneChannelsPass, intermediate_size
from graphopt.passes.prune_heads import PruneHeadsPass, head_layout
from graphopt.passes.prune_layers import PruneLayersPass

logger = logging.getLogger(__name__)

IMPORTANCE = ("measured", "random")
# How --params divides the removal: "uniform" removes the same fraction of heads and of MLP channels;
# "channels" removes MLP channels only; "layers" drops whole layers (then channels for the remainder).
SPLITS = ("uniform", "channels", "layers")
DEFAULT_SPLIT = "channels"
CHANNEL_MULTIPLE = 8


@dataclasses.dataclass
class Plan:
    """What to keep: query heads and MLP channels per layer (only layers that change), layers to drop."""

    heads: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    channels: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    drop: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Shapes:
    """Per-layer sizes of the unpruned graph and the parameters each prunable unit carries."""

    layouts: list[tuple[int, int, int]]  # (heads, kv_heads, head_dim)
    intermediate: list[int]
    group_cost: list[int]  # parameters of one KV group with its query heads
    channel_cost: list[int]
    layer_cost: list[int]
    total: int


def _size(value: ir.Value | None) -> int:
    return math.prod(value.shape) if value is not None else 0


def measure_shapes(model: ir.Model) -> Shapes:
    graph = model.graph
    layers = common.decoder_layers(graph)
    layouts = [head_layout(graph, layer) for layer in layers]
    group_cost, channel_cost, layer_cost = [], [], []
    for layer, (heads, kv_heads, head_dim) in zip(layers, layouts):
        hidden = layer.o.weight.shape[1]
        rep = heads // kv_heads
        # One KV group: rep query heads (q columns, o rows) and one KV head (k and v columns), biases included.
        q_in = layer.qkv or layer.q
        kv_in = layer.qkv or layer.k
        q_cost = q_in.weight.shape[0] + (q_in.bias is not None) + hidden
        kv_cost = kv_in.weight.shape[0] + (kv_in.bias is not None)
        group_cost.append(head_dim * (rep * q_cost + 2 * kv_cost))
        channel_cost.append(sum(linear.weight.shape[0] + (linear.bias is not None) for linear in layer.mlp_in)
                            + layer.down.weight.shape[1])
        layer_cost.append(sum(_size(value) for name, value in graph.initializers.items()
                              if common.layer_of(name) == layer.index))
    return Shapes(layouts, [intermediate_size(layer) for layer in layers], group_cost, channel_cost, layer_cost,
                  graph_ir.parameter_count(model))


def plan_heads(fraction: float, importance: Importance, shapes: Shapes, layers: list[int] | None = None) -> dict:
    """Keep lists that remove ``fraction`` of the query heads as whole KV groups, lowest first."""
    layers = range(len(shapes.layouts)) if layers is None else layers
    total = sum(shapes.layouts[index][0] for index in layers)
    target = round(fraction * total)
    groups = []
    for index in layers:
        heads, kv_heads, _ = shapes.layouts[index]
        rep = heads // kv_heads
        for group in range(kv_heads):
            groups.append((float(importance.heads[index][group * rep:(group + 1) * rep].sum()), index, group))
    remaining = {index: shapes.layouts[index][1] for index in layers}
    dropped: dict[int, set[int]] = {}
    removed = 0
    for _score, index, group in sorted(groups):
        rep = shapes.layouts[index][0] // shapes.layouts[index][1]
        if removed + rep / 2 > target:
            break
        if remaining[index] == 1:
            continue
        dropped.setdefault(index, set()).add(group)
        remaining[index] -= 1
        removed += rep
    keep = {}
    for index, groups_gone in dropped.items():
        heads, kv_heads, _ = shapes.layouts[index]
        rep = heads // kv_heads
        keep[index] = [head for head in range(heads) if head // rep not in groups_gone]
    return keep


def plan_channels(fraction: float, importance: Importance, shapes: Shapes, layers: list[int] | None = None) -> dict:
    """Keep lists that remove ``fraction`` of every layer's MLP channels, lowest scores first."""
    layers = range(len(shapes.intermediate)) if layers is None else layers
    keep = {}
    for index in layers:
        size = shapes.intermediate[index]
        kept = size - round(fraction * size)
        if size >= 8 * CHANNEL_MULTIPLE:
            kept = max(CHANNEL_MULTIPLE, CHANNEL_MULTIPLE * round(kept / CHANNEL_MULTIPLE))
        kept = max(1, min(size, kept))
        if kept < size:
            keep[index] = sorted(np.argsort(-importance.channels[index], kind="stable")[:kept].tolist())
    return keep


def plan_layers(count: int, importance: Importance, shapes: Shapes) -> list[int]:
    """The ``count`` layers that change the residual stream least."""
    if count >= len(shapes.layouts):
        raise GraphoptError(f"cannot drop {count} of {len(shapes.layouts)} layers (at least one must stay)")
    return sorted(np.argsort(importance.layers, kind="stable")[:count].tolist())


def removed_parameters(plan: Plan, shapes: Shapes) -> int:
    removed = sum(shapes.layer_cost[index] for index in plan.drop)
    for index, kept in plan.heads.items():
        if index in plan.drop:
            continue
        heads, kv_heads, _ = shapes.layouts[index]
        removed += (kv_heads - len({head // (heads // kv_heads) for head in kept})) * shapes.group_cost[index]
    for index, kept in plan.channels.items():
        if index not in plan.drop:
            removed += (shapes.intermediate[index] - len(kept)) * shapes.channel_cost[index]
    return removed


def plan_for_parameters(target: float, split: str, importance: Importance, shapes: Shapes) -> Plan:
    """A plan removing about ``target`` of all parameters with ``split`` (one of ``SPLITS``)."""
    goal = target * shapes.total
    plan = Plan()
    if split == "layers":
        order = np.argsort(importance.layers, kind="stable").tolist()
        while order and len(plan.drop) < len(shapes.layouts) - 1:
            candidate = shapes.layer_cost[order[0]]
            if removed_parameters(plan, shapes) + candidate / 2 > goal:
                break
            plan.drop.append(order.pop(0))
        plan.drop.sort()
    kept_layers = [index for index in range(len(shapes.layouts)) if index not in plan.drop]

    def attempt(fraction: float) -> Plan:
        heads = plan_heads(fraction, importance, shapes, kept_layers) if split == "uniform" else {}
        return Plan(heads, plan_channels(fraction, importance, shapes, kept_layers), plan.drop)

    if removed_parameters(plan, shapes) >= goal:
        return plan
    low, high = 0.0, 0.97
    if removed_parameters(attempt(high), shapes) < goal:
        raise GraphoptError(f"--params {target}: the '{split}' split cannot remove that much; try another split")
    for _ in range(30):
        middle = (low + high) / 2
        if removed_parameters(attempt(middle), shapes) < goal:
            low = middle
        else:
            high = middle
    best = min((attempt(low), attempt(high)), key=lambda candidate: abs(removed_parameters(candidate, shapes) - goal))
    return best


def _check_fraction(name: str, value: float | None) -> None:
    if value is not None and not 0.0 <= value < 1.0:
        raise GraphoptError(f"--{name} must be a fraction in [0, 1), got {value}")


def prune(model_dir: str | pathlib.Path, output: str | pathlib.Path, heads: float | None = None,
          channels: float | None = None, layers: int | None = None, params: float | None = None,
          split: str = DEFAULT_SPLIT, importance: str = "measured", calib: CalibrationSpec = CalibrationSpec(),
          seed: int = 0, force: bool = False, progress: Callable[[str], None] = lambda message: None) -> ModelDir:
    """Prune ``model_dir`` into ``output`` and return the new model directory.

    Give any of ``heads`` / ``channels`` (fractions removed), ``layers`` (count dropped), or ``params``
    (fraction of all parameters removed, divided by ``split``) but not ``params`` with the others.
    """
    started = time.perf_counter()
    source = ModelDir.open(model_dir)
    for name, value in (("heads", heads), ("channels", channels), ("params", params)):
        _check_fraction(name, value)
    if layers is not None and layers < 0:
        raise GraphoptError(f"--layers must be a count of layers to drop, got {layers}")
    if params is not None and any(value is not None for value in (heads, channels, layers)):
        raise GraphoptError("give --params alone, or --heads/--channels/--layers, not both")
    if importance not in IMPORTANCE:
        raise GraphoptError(f"--importance must be one of {', '.join(IMPORTANCE)}, got {importance!r}")
    if split not in SPLITS:
        raise GraphoptError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    model = graph_ir.load(source.model_path)
    shapes = measure_shapes(model)
    if layers is not None and layers >= len(shapes.layouts):
        raise GraphoptError(f"cannot drop {layers} of {len(shapes.layouts)} layers (at least one must stay)")
    nothing = not any((heads, channels, layers, params))
    if nothing:
        scores = None
    elif importance == "random":
        scores = random_importance(model, seed)
    else:
        progress(f"measuring importance on calibration data ({calib.describe()['source']}, {calib.samples} x "
                 f"{calib.seq_len} tokens)")
        sequences = calibration_sequences(source.path, calib)
        scores = measured_importance(source.model_path, model, sequences)
    if nothing:
        plan = Plan()
    elif params is not None:
        plan = plan_for_parameters(params, split, scores, shapes)
    else:
        drop = plan_layers(layers, scores, shapes) if layers else []
        kept = [index for index in range(len(shapes.layouts)) if index not in drop]
        plan = Plan(plan_heads(heads, scores, shapes, kept) if heads else {},
                    plan_channels(channels, scores, shapes, kept) if channels else {}, drop)
    return apply_plan(source, model, plan, output, force=force, progress=progress, started=started,
                      parameters={"heads": heads, "channels": channels, "layers": layers, "params": params,
                                  "split": split if params is not None else None, "importance": importance,
                                  "calibration": calib.describe() if importance == "measured" else None, "seed": seed})


def apply_plan(source: ModelDir, model: ir.Model, plan: Plan, output, force: bool = False,
               progress: Callable[[str], None] = lambda message: None, started: float | None = None,
               parameters: dict | None = None) -> ModelDir:
    """Run the prune passes for ``plan`` on ``model`` (loaded from ``source``) and write ``output``."""
    started = time.perf_counter() if started is None else started
    before = graph_ir.parameter_count(model)
    heads_pass, channels_pass, layers_pass = PruneHeadsPass(plan.heads), PruneChannelsPass(plan.channels), \
        PruneLayersPass(plan.drop)
    counts: dict[str, int] = {}
    modified = False
    # Order: heads and channels index the unpruned layers; dropping layers renumbers them, so it is last.
    for prune_pass in (heads_pass, channels_pass, layers_pass):
        result = prune_pass(model)
        modified |= result.modified
        counts.update({key: value for key, value in prune_pass.counts.items() if value})
    after = graph_ir.parameter_count(model)
    progress(f"removed {before - after:,} of {before:,} parameters ({(before - after) / before:.1%})")
    kept = layers_pass.kept or list(range(len(heads_pass.layout)))
    layout = [heads_pass.layout[index] for index in kept]
    sizes = [channels_pass.sizes[index] for index in kept]
    with atomic_output(output, force) as scratch:
        graph_ir.save(model, scratch / "model.onnx")
        manifest = source.manifest
        updates = _manifest_updates(manifest, model, layout, sizes)
        figures = {"parameters_before": before, "parameters_after": after,
                   "removed_fraction": round((before - after) / before, 6), **counts, "modified": modified,
                   "kept_layers": kept}
        derive(source, scratch, {"pass": "prune", "counts": counts, "parameters": {k: v for k, v in (parameters or {}).items()
                                                                    if v is not None},
                                 "figures": figures, "seconds": round(time.perf_counter() - started, 1)}, **updates)
    return ModelDir.open(output)


def _manifest_updates(manifest: dict, model: ir.Model, layout: list[tuple[int, int]], sizes: list[int]) -> dict:
    """New shapes for graphopt.json: scalars stay scalars when every layer agrees, per-layer lists always."""
    heads = [heads for heads, _ in layout]
    kv_heads = [kv for _, kv in layout]
    cache = dict(manifest.get("cache", {}))
    cache["kv_heads"] = kv_heads
    return {
        "layers": len(layout),
        "heads": heads[0] if len(set(heads)) == 1 else max(heads),
        "kv_heads": kv_heads[0] if len(set(kv_heads)) == 1 else max(kv_heads),
        "intermediate_size": sizes[0] if len(set(sizes)) == 1 else max(sizes),
        "layer_heads": heads,
        "layer_kv_heads": kv_heads,
        "layer_intermediate_sizes": sizes,
        "cache": cache,
        "inputs": [value.name for value in model.graph.inputs],
        "outputs": [value.name for value in model.graph.outputs],
    }
