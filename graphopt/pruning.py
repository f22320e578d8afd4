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

import numpy as np
import onnx_ir as ir

from graphopt import ir as graph_ir
from graphopt.calibration import CalibrationSpec, calibration_sequences
from graphopt.errors import GraphoptError
from graphopt.importance import Importance, measured_importance, random_importance
from graphopt.manifest import io_names
from graphopt.modeldir import ModelDir
from graphopt.passes import _prune_common as common
from graphopt.passes.prune_channels import PruneChannelsPass, intermediate_size
from graphopt.passes.prune_heads import PruneHeadsPass, head_layout
from graphopt.passes.prune_layers import PruneLayersPass
from graphopt.steps import Step, StepConfig, StepOutput, check_choice, run_step

logger = logging.getLogger(__name__)

IMPORTANCE = ("measured", "random")
KEEP_WHERE = ("ends", "first")
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
        # A packed [gate | up] projection has two columns per channel.
        channel_cost.append(sum((1 + (linear is layer.gate_up)) * (linear.weight.shape[0] + (linear.bias is not None))
                                for linear in layer.mlp_in) + layer.down.weight.shape[1])
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


def layers_to_drop(layers: int, keep: int, where: str) -> set[int]:
    """Which of ``layers`` to drop to keep ``keep``: ``first`` keeps the bottom layers (early exit),
    ``ends`` keeps the bottom half and top half of them and drops the middle (self-speculation)."""
    keep = max(1, min(keep, layers))
    if where == "first":
        kept = set(range(keep))
    elif where == "ends":
        bottom = (keep + 1) // 2
        kept = set(range(bottom)) | set(range(layers - (keep - bottom), layers))
    else:
        raise GraphoptError(f"unknown layer choice {where!r} ({' or '.join(KEEP_WHERE)})")
    return set(range(layers)) - kept


@dataclasses.dataclass(frozen=True)
class PruneConfig(StepConfig):
    """What to remove (see the module docstring). ``keep_layers`` keeps that fraction of the layers by
    position (:func:`layers_to_drop`, no calibration: what drafts use); ``plan`` is an explicit plan."""

    heads: float | None = None
    channels: float | None = None
    layers: int | None = None
    params: float | None = None
    split: str = DEFAULT_SPLIT
    importance: str = "measured"
    calib: CalibrationSpec = CalibrationSpec()
    seed: int = 0
    keep_layers: float | None = None
    keep_where: str = "ends"
    plan: Plan | None = None

    def __post_init__(self):
        for name in ("heads", "channels", "params"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise GraphoptError(f"--{name} must be a fraction in [0, 1), got {value}")
        if self.keep_layers is not None and not 0.0 < self.keep_layers <= 1.0:
            raise GraphoptError(f"keep_layers must be a fraction in (0, 1], got {self.keep_layers}")
        if self.layers is not None and self.layers < 0:
            raise GraphoptError(f"--layers must be a count of layers to drop, got {self.layers}")
        alone = [name for name in ("params", "keep_layers", "plan") if getattr(self, name) is not None]
        given = [name for name in ("heads", "channels", "layers", *alone) if getattr(self, name) is not None]
        if alone and len(given) > 1:
            other = next(name for name in given if name != alone[0])
            raise GraphoptError(f"give --{alone[0].replace('_', '-')} alone, not with --{other.replace('_', '-')}")
        check_choice("--importance", self.importance, IMPORTANCE)
        check_choice("--split", self.split, SPLITS)
        if self.keep_where not in KEEP_WHERE:
            raise GraphoptError(f"unknown layer choice {self.keep_where!r} ({' or '.join(KEEP_WHERE)})")

    @property
    def needs_importance(self) -> bool:
        return any((self.heads, self.channels, self.layers, self.params))

    def describe(self) -> dict:
        record = {key: value for key, value in super().describe().items() if value is not None}
        if self.params is None:
            record.pop("split", None)
        if not self.needs_importance or self.importance != "measured":
            record.pop("calib", None)
        return record


class PruneStep(Step):
    """Structured pruning: KV groups with their query heads, MLP channels, whole layers."""

    name = "prune"
    config_type = PruneConfig

    def run(self, source: ModelDir, model: ir.Model, config: PruneConfig, work) -> StepOutput:
        shapes = measure_shapes(model)
        layer_count = len(shapes.layouts)
        if config.layers is not None and config.layers >= layer_count:
            raise GraphoptError(f"cannot drop {config.layers} of {layer_count} layers (at least one must stay)")
        plan = self.plan(source, model, config, shapes)
        before = graph_ir.parameter_count(model)
        heads_pass, channels_pass, layers_pass = (PruneHeadsPass(plan.heads), PruneChannelsPass(plan.channels),
                                                  PruneLayersPass(plan.drop))
        counts: dict[str, int] = {}
        modified = False
        # Order: heads and channels index the unpruned layers; dropping layers renumbers them, so it is last.
        for prune_pass in (heads_pass, channels_pass, layers_pass):
            modified |= prune_pass(model).modified
            counts.update({key: value for key, value in prune_pass.counts.items() if value})
        after = graph_ir.parameter_count(model)
        logger.info("removed %s of %s parameters (%.1f%%)", f"{before - after:,}", f"{before:,}",
                    100 * (before - after) / before)
        kept = layers_pass.kept or list(range(len(heads_pass.layout)))
        layout = [heads_pass.layout[index] for index in kept]
        sizes = [channels_pass.sizes[index] for index in kept]
        figures = {"parameters_before": before, "parameters_after": after,
                   "removed_fraction": round((before - after) / before, 6), "kept_layers": kept}
        return StepOutput(model, counts, figures, modified, _manifest_updates(source.manifest.cache, layout, sizes))

    @staticmethod
    def plan(source: ModelDir, model: ir.Model, config: PruneConfig, shapes: Shapes) -> Plan:
        if config.plan is not None:
            return config.plan
        layer_count = len(shapes.layouts)
        if config.keep_layers is not None:
            return Plan(drop=sorted(layers_to_drop(layer_count, round(layer_count * config.keep_layers),
                                                   config.keep_where)))
        if not config.needs_importance:
            return Plan()
        if config.importance == "random":
            scores = random_importance(model, config.seed)
        else:
            calib = config.calib
            logger.info("measuring importance on calibration data (%s, %d x %d tokens)", calib.describe()["source"],
                        calib.samples, calib.seq_len)
            scores = measured_importance(source.model_path, model, calibration_sequences(source.path, calib))
        if config.params is not None:
            return plan_for_parameters(config.params, config.split, scores, shapes)
        # The layers that change the residual stream least (PruneStep checks that one stays).
        drop = sorted(np.argsort(scores.layers, kind="stable")[:config.layers].tolist()) if config.layers else []
        kept = [index for index in range(layer_count) if index not in drop]
        return Plan(plan_heads(config.heads, scores, shapes, kept) if config.heads else {},
                    plan_channels(config.channels, scores, shapes, kept) if config.channels else {}, drop)


def prune(model_dir: str | pathlib.Path, output: str | pathlib.Path, force: bool = False, **parameters) -> ModelDir:
    """Prune ``model_dir`` into ``output`` and return the new model directory (``parameters``: :class:`PruneConfig`)."""
    return run_step(PruneStep(), model_dir, output, PruneConfig(**parameters), force=force).output


def apply_plan(source: ModelDir, plan: Plan, output, force: bool = False) -> ModelDir:
    """Prune ``source`` with an explicit ``plan`` into ``output``."""
    return prune(source.path, output, force=force, plan=plan)


def _manifest_updates(cache: dict, layout: list[tuple[int, int]], sizes: list[int]) -> dict:
    """New shapes for graphopt.json: scalars stay scalars when every layer agrees, per-layer lists always."""
    heads = [heads for heads, _ in layout]
    kv_heads = [kv for _, kv in layout]
    inputs, outputs = io_names(len(layout))
    return {
        "layers": len(layout),
        "heads": heads[0] if len(set(heads)) == 1 else max(heads),
        "kv_heads": kv_heads[0] if len(set(kv_heads)) == 1 else max(kv_heads),
        "intermediate_size": sizes[0] if len(set(sizes)) == 1 else max(sizes),
        "layer_heads": heads,
        "layer_kv_heads": kv_heads,
        "layer_intermediate_sizes": sizes,
        "cache": {**cache, "kv_heads": kv_heads},
        "inputs": inputs,
        "outputs": outputs,
    }
