"""Recipes for `graphopt optimize`: named pipelines of stages, as data.

A recipe is a list of stages run in order, each turning the model directory the stage before wrote
into a new one (``export``, ``prune``, ``fuse``, ``convert``, ``quantize``), checking it
(``validate``) or building the draft for speculative decoding beside it (``draft``). The stage
kinds and what each calls are in ``graphopt.optimize.STAGES``; parameters are the keyword
arguments of those calls. Every ordering constraint is written next to the stage it binds.

The ordering constraints common to all recipes:

* ``prune`` comes before ``quantize``: pruning slices float weights and refuses quantized graphs.
* ``prune`` comes before ``fuse``: pruning heads rewrites the Reshape constants of the written-out
  attention; fusing afterwards reads the smaller head counts from the pruned graph, so no fused
  op attribute needs rewriting.
* ``fuse`` comes before ``quantize`` and ``convert``: the fusion rules match float32 subgraphs of
  the export; quantization keeps MatMuls as MatMuls inside fused graphs, so the order
  fuse -> quantize is the one both passes support.
* ``validate`` follows the last stage that writes the target: it checks the model that ships.
* ``draft`` comes last and builds from the float ``export`` stage (graphopt.drafting's steps take a
  float model). Its recipe is ``int4`` (graphopt's weight-only int4, MatMulNBits, all layers): dropping half of
  SmolLM2-135M's layers leaves ~4% greedy agreement (measured by optimize's draft row), so the
  layer-dropping drafts are not used. An int4 target gets no draft: a same-depth int4 draft costs
  what the target costs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from graphopt.errors import GraphoptError

STAGE_KINDS = ("export", "prune", "fuse", "convert", "quantize", "validate", "draft")
MODEL_STAGES = ("export", "prune", "fuse", "convert", "quantize")  # stages that write a new target


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of a recipe: a stage kind and the keyword arguments of its call."""

    kind: str
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        arguments = ", ".join(f"{key}={value}" for key, value in self.parameters.items())
        return f"{self.kind}({arguments})"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named pipeline and the execution provider its target is made for (and measured on)."""

    name: str
    description: str
    ep: str
    stages: tuple[Stage, ...]


RECIPES: dict[str, Recipe] = {recipe.name: recipe for recipe in (
    Recipe("cpu-int8", "CPU, int8 weight-only (MatMulNBits), float activations: near-lossless, ~2x fp32 decode",
           ep="cpu", stages=(
               Stage("export"),
               # fuse before quantize (see the module docstring).
               Stage("fuse", {"target": "cpu"}),
               Stage("quantize", {"weights": "int8", "activations": "none"}),
               # after the last model stage: it checks the target that ships.
               Stage("validate", {"min_token_agreement": 0.90, "max_perplexity_increase": 5.0}),
               # from the float export: drafting's steps take a float model.
               Stage("draft", {"recipe": "int4", "source": "export"}),
           )),
    Recipe("cpu-int4", "CPU, int4 weight-only (GPTQ, LM head int8): smallest and fastest CPU decode; no draft",
           ep="cpu", stages=(
               Stage("export"),
               Stage("fuse", {"target": "cpu"}),  # before quantize
               # GPTQ: on SmolLM2-135M (2 windows of 512) round-to-nearest kept 68.8% token agreement,
               # GPTQ 75.2% at +20.2% perplexity; the bounds below sit just outside what GPTQ reaches.
               # Block sizes and packing: the CPU kernels' defaults (graphopt.cpu_kernels).
               Stage("quantize", {"weights": "int4", "activations": "none", "method": "gptq"}),
               Stage("validate", {"min_token_agreement": 0.70, "max_perplexity_increase": 25.0}),
               # no draft: an int4 draft of the same depth costs what this target costs.
           )),
    Recipe("cpu-w8a8", "CPU, static int8 weights and activations (QDQ, calibrated, SmoothQuant 0.5)",
           ep="cpu", stages=(
               Stage("export"),
               Stage("fuse", {"target": "cpu"}),  # before quantize
               Stage("quantize", {"weights": "int8", "activations": "int8", "smooth": 0.5}),
               Stage("validate", {"min_token_agreement": 0.80, "max_perplexity_increase": 10.0}),
               Stage("draft", {"recipe": "int4", "source": "export"}),  # from the float export
           )),
    Recipe("cuda-fp16", "CUDA, float16 with norms/softmax/logits in float32, contrib attention",
           ep="cuda", stages=(
               Stage("export"),
               # fuse before convert: the fusion rules match float32 subgraphs. Packed q/k/v:
               # two fewer kernels per layer, 777 vs 663 tokens/s with CUDA graphs on an H200.
               Stage("fuse", {"target": "cuda", "pack_qkv": True}),
               Stage("convert", {"dtype": "fp16"}),
               Stage("validate", {"min_token_agreement": 0.95, "max_perplexity_increase": 1.0}),
               Stage("draft", {"recipe": "int4", "source": "export"}),  # from the float export
           )),
    Recipe("tensorrt-int8", "TensorRT, opset-23 Attention, symmetric int8 QDQ on weights and activations",
           ep="tensorrt", stages=(
               Stage("export"),
               # fuse before quantize; the tensorrt target also raises the opset to 23 (Attention).
               Stage("fuse", {"target": "tensorrt"}),
               # symmetric: TensorRT's explicit-quantization mode takes zero points of 0 only.
               Stage("quantize", {"weights": "int8", "activations": "int8", "symmetric": True}),
               Stage("validate", {"min_token_agreement": 0.80, "max_perplexity_increase": 10.0}),
               Stage("draft", {"recipe": "int4", "source": "export"}),  # from the float export
           )),
    Recipe("edge-small", "Edge/mobile: 25% of parameters pruned (MLP channels), fused, int4; no draft "
           "(one model in memory)",
           ep="cpu", stages=(
               Stage("export"),
               # prune before fuse and quantize (see the module docstring).
               Stage("prune", {"params": 0.25}),
               Stage("fuse", {"target": "cpu"}),
               Stage("quantize", {"weights": "int4", "activations": "none"}),
               Stage("validate", {"min_token_agreement": 0.5, "max_perplexity_increase": 100.0}),
           )),
)}

# The recipe that passes its own validation on SmolLM2-135M with the widest margin (int8 weights:
# 94.8% token agreement, perplexity -0.9%); int4 is smaller and faster but loses ~20% perplexity.
DEFAULT_RECIPE = "cpu-int8"


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise GraphoptError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)} (graphopt optimize --list-recipes)")
    return RECIPES[name]


def check_order(recipe: Recipe) -> None:
    """Refuse a recipe whose stages break the ordering constraints of the module docstring."""
    kinds = [stage.kind for stage in recipe.stages]
    unknown = [kind for kind in kinds if kind not in STAGE_KINDS]
    if unknown:
        raise GraphoptError(f"recipe {recipe.name}: unknown stage {unknown[0]!r}; stages are {', '.join(STAGE_KINDS)}")
    if not kinds or kinds[0] != "export":
        raise GraphoptError(f"recipe {recipe.name}: the first stage must be export")

    def position(kind: str) -> int | None:
        return kinds.index(kind) if kind in kinds else None

    for before, after in (("prune", "quantize"), ("prune", "fuse"), ("fuse", "quantize"), ("fuse", "convert")):
        first, second = position(before), position(after)
        if first is not None and second is not None and first > second:
            raise GraphoptError(f"recipe {recipe.name}: {before} must come before {after}")
    last_model = max(index for index, kind in enumerate(kinds) if kind in MODEL_STAGES)
    if any(kind == "validate" and index < last_model for index, kind in enumerate(kinds)):
        raise GraphoptError(f"recipe {recipe.name}: validate must follow the last stage that writes the target")


def describe(recipe: Recipe) -> str:
    return f"{recipe.name} ({recipe.ep}): {recipe.description}\n    " + " -> ".join(
        stage.describe() for stage in recipe.stages)
