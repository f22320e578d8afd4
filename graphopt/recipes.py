"""Recipes for `graphopt optimize`: named pipelines of stages, as data.

A recipe is a list of stages run in order, each turning the model directory the stage before wrote
into a new one (``export``, ``prune``, ``fuse``, ``convert``, ``quantize``), checking it
(``validate``) or building the draft for speculative decoding beside it (``draft``). Model stages
are the registered steps (:data:`STEPS`); every stage's parameters are its config type's fields.

The ordering constraints common to all recipes:

* ``prune`` comes before ``quantize``: pruning slices float weights and refuses quantized graphs.
* ``prune`` comes before ``fuse``: pruning heads rewrites the Reshape constants of the written-out
  attention; fusing afterwards reads the smaller head counts from the pruned graph, so no fused
  op attribute needs rewriting.
* ``distill`` comes after ``prune`` and before ``fuse``, ``quantize`` and ``convert``: it trains the
  weights of a float, written-out graph (graphopt.student refuses fused and quantized graphs) to
  heal what pruning removed.
* ``fuse`` comes before ``quantize`` and ``convert``: the fusion rules match float32 subgraphs of
  the export; quantization keeps MatMuls as MatMuls inside fused graphs, so the order
  fuse -> quantize is the one both passes support.
* ``validate`` follows the last stage that writes the target: it checks the model that ships.
* ``draft`` comes last and builds from the float ``export`` stage (draft recipes prune and
  quantize, which take a float model). Its recipe is ``int4`` (graphopt's weight-only int4, MatMulNBits, all layers): dropping half of
  SmolLM2-135M's layers leaves ~4% greedy agreement (measured by optimize's draft row), so the
  layer-dropping drafts are not used. An int4 target gets no draft: a same-depth int4 draft costs
  what the target costs.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping

from graphopt.convert import ConvertStep
from graphopt.distill import DistillConfig
from graphopt.errors import GraphoptError
from graphopt.export import DEFAULT_OPSET
from graphopt.fusion import FuseStep
from graphopt.modeldir import ModelDir
from graphopt.pruning import PruneStep
from graphopt.quantization import QuantizeStep
from graphopt.steps import Step, StepConfig, StepRecord, run_step
from graphopt.vocabulary import VocabularyStep

# The registry of model-directory steps: the CLI commands, `graphopt optimize` and `graphopt draft`
# all run these through graphopt.steps.run_step. A new step is one line here.
STEPS: dict[str, Step] = {step.name: step for step in (PruneStep(), FuseStep(), ConvertStep(), QuantizeStep(),
                                                        VocabularyStep())}

# --- the pipeline stages that are not model steps; their parameters are typed like a step's ----------

@dataclasses.dataclass(frozen=True)
class ExportStage(StepConfig):
    """SRC as a float32 model directory: exported (and validated against PyTorch), or SRC itself."""

    opset: int = DEFAULT_OPSET


@dataclasses.dataclass(frozen=True)
class ValidateStage(StepConfig):
    """Bounds on the target against the float32 export: token agreement, perplexity increase (percent),
    and answers kept (mean index of the first greedy token that leaves the export's answer to
    ``graphopt.optimize.ANSWER_PROMPTS``; measured and reported always, bounded when above 0)."""

    min_token_agreement: float = 0.9
    max_perplexity_increase: float = 5.0
    min_answers_kept: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.min_token_agreement <= 1.0:
            raise GraphoptError(f"min_token_agreement must be in [0, 1], got {self.min_token_agreement}")
        if self.min_answers_kept < 0:
            raise GraphoptError(f"min_answers_kept is a number of tokens of at least 0, got {self.min_answers_kept}")


@dataclasses.dataclass(frozen=True)
class DraftStage(StepConfig):
    """A draft for speculative decoding, by a draft recipe (or ``auto``) from an earlier stage's model."""

    recipe: str = "auto"
    source: str = "export"

    def __post_init__(self):
        if self.recipe != "auto" and self.recipe not in DRAFT_RECIPES:
            raise GraphoptError(f"unknown draft recipe {self.recipe!r}; choose from auto, {', '.join(DRAFT_RECIPES)}")


# distill trains (many processes under torchrun, checkpoints, resume): a pipeline stage with its own
# runner (graphopt.distill), not a single-process graph rewrite.
STAGE_CONFIGS: dict[str, type[StepConfig]] = {"export": ExportStage, "distill": DistillConfig,
                                              "validate": ValidateStage, "draft": DraftStage}


STAGE_KINDS = ("export", *STEPS, "distill", "validate", "draft")
MODEL_STAGES = ("export", *STEPS, "distill")  # stages that write a new target


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of a recipe: a stage kind and the keyword arguments of its call."""

    kind: str
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        arguments = ", ".join(f"{key}={value}" for key, value in self.parameters.items())
        return f"{self.kind}({arguments})"

    def config(self) -> StepConfig:
        """The stage's typed, validated parameters (a registered step's config, or a pipeline stage's)."""
        config_type = STEPS[self.kind].config_type if self.kind in STEPS else STAGE_CONFIGS[self.kind]
        return config_type.from_parameters(dict(self.parameters))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named pipeline and the execution provider its target is made for (and measured on)."""

    name: str
    description: str
    ep: str
    stages: tuple[Stage, ...]


# Every recipe fuses with every attention layer required. The tolerance (max |logits diff| to the
# unfused source) is looser than `graphopt fuse`'s 1e-3: fused kernels sum in another order, and on
# a pruned SmolLM2-135M (logits up to ~30) that alone reached 1.07e-3. Perplexity and agreement in
# the report show any real difference.
_FUSE = {"require": True, "tolerance": 1e-2}

RECIPES: dict[str, Recipe] = {recipe.name: recipe for recipe in (
    Recipe("cpu-int8", "CPU, int8 weight-only (MatMulNBits), float activations: near-lossless, ~2x fp32 decode",
           ep="cpu", stages=(
               Stage("export"),
               # fuse before quantize (see the module docstring).
               Stage("fuse", {"target": "cpu", **_FUSE}),
               Stage("quantize", {"weights": "int8", "activations": "none"}),
               # after the last model stage: it checks the target that ships.
               Stage("validate", {"min_token_agreement": 0.90, "max_perplexity_increase": 5.0}),
               # from the float export: drafting's steps take a float model.
               Stage("draft", {"recipe": "int4", "source": "export"}),
           )),
    Recipe("cpu-int4", "CPU, int4 weight-only (affine blocks, LM head and embedding int8): smallest and fastest CPU "
           "decode; no draft",
           ep="cpu", stages=(
               Stage("export"),
               Stage("fuse", {"target": "cpu", **_FUSE}),  # before quantize
               # The quantize defaults: affine blocks (SmolLM2, all 14 windows: +0.55% perplexity, where
               # round-to-nearest lost 27% and GPTQ 25%), the CPU kernels' block sizes, packed q/k/v and
               # gate/up. The bounds are the earlier GPTQ recipe's, not yet re-measured with affine.
               Stage("quantize", {"weights": "int4"}),
               Stage("validate", {"min_token_agreement": 0.70, "max_perplexity_increase": 25.0}),
               # no draft: an int4 draft of the same depth costs what this target costs.
           )),
    Recipe("cpu-w8a8", "CPU, static int8 weights and activations (QDQ, calibrated; residual stream rotated, "
           "down projections weight-only int8)",
           ep="cpu", stages=(
               Stage("export"),
               Stage("fuse", {"target": "cpu", **_FUSE}),  # before quantize
               # the quantize defaults: +2.5% on SmolLM2; SmoothQuant 0.5 on top measured worse (+2.7%)
               Stage("quantize", {"weights": "int8", "activations": "int8"}),
               Stage("validate", {"min_token_agreement": 0.80, "max_perplexity_increase": 10.0}),
               Stage("draft", {"recipe": "int4", "source": "export"}),  # from the float export
           )),
    Recipe("cuda-fp16", "CUDA, float16 with norms/softmax/logits in float32, contrib attention",
           ep="cuda", stages=(
               Stage("export"),
               # fuse before convert: the fusion rules match float32 subgraphs. Packed q/k/v:
               # two fewer kernels per layer, 777 vs 663 tokens/s with CUDA graphs on an H200; packed
               # gate/up (a Split for a GEMM): 861 vs 851 tokens/s, 44 us less graph replay, on an H100.
               Stage("fuse", {"target": "cuda", "pack_qkv": True, "pack_gate_up": True, **_FUSE}),
               Stage("convert", {"dtype": "fp16"}),
               Stage("validate", {"min_token_agreement": 0.95, "max_perplexity_increase": 1.0}),
               # no draft: the int4 draft (float MatMulNBits, no CUDA graph) decoded 66 tokens/s beside
               # this target's 800 on an H200 and its own pair measurement lost (576 tokens/s); a
               # half-layer fp16 draft with CUDA graphs (verify graphed too) has ~1-3% acceptance and
               # runs at 0.30-0.61x plain (tools/results/gpu_check_h200.json).
           )),
    Recipe("tensorrt-int8", "TensorRT, opset-23 Attention, symmetric int8 QDQ on weights and activations",
           ep="tensorrt", stages=(
               Stage("export"),
               # fuse before quantize; the tensorrt target also raises the opset to 23 (Attention).
               Stage("fuse", {"target": "tensorrt", **_FUSE}),
               # symmetric: TensorRT's explicit-quantization mode takes zero points of 0 only.
               Stage("quantize", {"weights": "int8", "activations": "int8", "symmetric": True}),
               Stage("validate", {"min_token_agreement": 0.80, "max_perplexity_increase": 10.0}),
               Stage("draft", {"recipe": "int4", "source": "export"}),  # from the float export
           )),
    Recipe("edge-small", "Edge/mobile: 25% of parameters pruned (MLP channels), healed by 10 minutes of "
           "distillation on the CPU, fused, int4; no draft (one model in memory)",
           ep="cpu", stages=(
               Stage("export"),
               # prune, then distill, before fuse and quantize (see the module docstring).
               Stage("prune", {"params": 0.25}),
               # The export is the teacher. Without healing, 25% pruned SmolLM2 loses 3.6x perplexity.
               Stage("distill", {"max_minutes": 10.0, "device": "cpu"}),
               Stage("fuse", {"target": "cpu", **_FUSE}),
               Stage("quantize", {"weights": "int4"}),
               Stage("validate", {"min_token_agreement": 0.5, "max_perplexity_increase": 100.0}),
           )),
)}

# Draft recipes: pipelines from the (float) target to a draft for speculative decoding. Layer edits
# come before quantization: they address layers through the float graph's weight names, which
# quantization renames. The LM head stays int8: its logits decide which token the draft proposes,
# so it is where low bits cost most acceptance.
_DRAFT_QUANTIZE = {"activations": "none", "head": "int8"}
DRAFT_RECIPES: dict[str, Recipe] = {recipe.name: recipe for recipe in (
    Recipe("int8", "int8 weight-only copy", ep="cpu", stages=(Stage("quantize", {"weights": "int8", **_DRAFT_QUANTIZE}),)),
    Recipe("int4", "int4 weight-only copy", ep="cpu", stages=(Stage("quantize", {"weights": "int4", **_DRAFT_QUANTIZE}),)),
    Recipe("half-layers", "the bottom and top quarters of the layers", ep="cpu",
           stages=(Stage("prune", {"keep_layers": 0.5, "keep_where": "ends"}),)),
    Recipe("half-layers-int4", "half the layers (ends), int4", ep="cpu",
           stages=(Stage("prune", {"keep_layers": 0.5, "keep_where": "ends"}),
                   Stage("quantize", {"weights": "int4", **_DRAFT_QUANTIZE}))),
    Recipe("early-exit-int4", "the bottom half of the layers, int4", ep="cpu",
           stages=(Stage("prune", {"keep_layers": 0.5, "keep_where": "first"}),
                   Stage("quantize", {"weights": "int4", **_DRAFT_QUANTIZE}))),
    # DistillSpec-style: a quarter of the layers, trained to imitate the target (teacher = the
    # draft's source), its head cut to the 8192 tokens it samples most (SmolLM2: a draft step 3.3 ->
    # 2.4 ms, acceptance unchanged), then int8. Needs a float, unfused source (optimize's export).
    Recipe("distilled", "a quarter of the layers (ends), distilled from the target, 8k-token head, int8", ep="cpu",
           stages=(Stage("prune", {"keep_layers": 0.25, "keep_where": "ends"}),
                   Stage("distill", {"max_minutes": 10.0, "device": "cpu", "batch_size": 4, "seq_len": 128,
                                     "lr": 1e-3, "warmup_steps": 2, "eval_windows": 0}),
                   Stage("vocabulary", {"size": 8192}),
                   Stage("quantize", {"weights": "int8", **_DRAFT_QUANTIZE}))),
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

    for before, after in (("prune", "quantize"), ("prune", "fuse"), ("fuse", "quantize"), ("fuse", "convert"),
                          ("prune", "distill"), ("distill", "fuse"), ("distill", "quantize"), ("distill", "convert")):
        first, second = position(before), position(after)
        if first is not None and second is not None and first > second:
            raise GraphoptError(f"recipe {recipe.name}: {before} must come before {after}")
    last_model = max(index for index, kind in enumerate(kinds) if kind in MODEL_STAGES)
    if any(kind == "validate" and index < last_model for index, kind in enumerate(kinds)):
        raise GraphoptError(f"recipe {recipe.name}: validate must follow the last stage that writes the target")


def check_parameters(recipe: Recipe) -> None:
    """Every stage's parameters are valid before anything runs (a typo or a bad value fails in a second)."""
    for stage in recipe.stages:
        try:
            stage.config()
        except (TypeError, GraphoptError) as error:
            raise GraphoptError(f"recipe {recipe.name}: stage {stage.describe()}: {error}") from None


def run_stage(stage: Stage, source: ModelDir, output: pathlib.Path) -> StepRecord:
    """One registered step's stage on ``source`` into ``output``."""
    return run_step(STEPS[stage.kind], source.path, output, stage.config())


def describe(recipe: Recipe) -> str:
    return f"{recipe.name} ({recipe.ep}): {recipe.description}\n    " + " -> ".join(
        stage.describe() for stage in recipe.stages)
