"""The fuse step: the fusion pipeline per target (as data), run by the step runner.

Targets (where the model will run, so which fused ops it may use) are the records of
``graphopt.passes.targets``; ``fuse()`` is what the CLI and ``export --fuse`` call.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from graphopt.errors import GraphoptError, ValidationError
from graphopt.evaluate import compare_logits
from graphopt.modeldir import ModelDir
from graphopt.passes._rule_pass import RulePass
from graphopt.passes.fuse_attention import CONTRIB_DOMAIN, FuseAttention, fused_attention_count
from graphopt.passes.fuse_gelu import FuseGelu
from graphopt.passes.fuse_norm import FuseNormalization
from graphopt.passes.fuse_rotary import FuseRotaryEmbedding
from graphopt.passes.pack_matmulnbits import PackMatMulNBitsPass
from graphopt.passes.targets import TARGETS, Target, get_target
from graphopt.steps import Step, StepConfig, StepOutput, run_step

logger = logging.getLogger(__name__)


class ConvertOpset(ir.passes.InPlacePass):
    """Raise the default-domain opset to ``opset`` with onnxscript's version converter (in place).

    ``modified`` is False when the model already has that opset or a newer one.
    """

    def __init__(self, opset: int):
        super().__init__()
        self.opset = opset
        self.counts: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxscript.version_converter import ConvertVersionPass

        if model.opset_imports.get("", 0) >= self.opset:
            return ir.passes.PassResult(model, modified=False)
        ConvertVersionPass(self.opset)(model)
        if model.opset_imports.get("", 0) < self.opset:
            raise GraphoptError(f"could not convert the model to opset {self.opset}")
        return ir.passes.PassResult(model, modified=True)


def pipeline(target: Target | str, max_positions: int | None, pack_qkv: bool = False,
             pack_gate_up: bool = False) -> list[ir.passes.PassBase]:
    """The passes for ``target``, in order. ``max_positions`` sizes the rotary caches of GQA;
    ``pack_qkv`` makes GQA's query, key and value projections one MatMul, ``pack_gate_up`` the MLP's
    gate and up projections one MatMul and a Split."""
    spec = get_target(target)
    passes: list[ir.passes.PassBase] = []
    if spec.opset:
        # First: Attention and RMSNormalization exist only from opset 23, the rules check for it.
        passes.append(ConvertOpset(spec.opset))
    # Attention first: the GroupQueryAttention pattern includes the RoPE ops, so the rotary
    # rule (standard targets only) must not take them before it. Norm and GELU patterns never
    # overlap attention; their order is only for readable logs.
    passes.append(FuseAttention(spec, max_positions=max_positions, pack_qkv=pack_qkv))
    if not spec.contrib_ops:
        passes.append(FuseRotaryEmbedding())
    passes += [
        FuseNormalization(spec),
        FuseGelu(spec),
        # The mask and rotary subgraphs the fused ops no longer read; the rewriter inserts new
        # nodes at the match root, so sort to keep the graph topologically ordered.
        RemoveUnusedNodesPass(),
        # After the clean-up: the projections the attention rules replaced are gone by then.
        *([PackMatMulNBitsPass("MatMul")] if pack_gate_up else []),
        TopologicalSortPass(),
    ]
    return passes


@dataclasses.dataclass
class FusionResult:
    counts: dict[str, int]
    modified: bool
    attention_layers: int
    explanations: list[str]


def fuse_model(model: ir.Model, target: str, layers: int, max_positions: int | None = None,
               explain: bool = False, pack_qkv: bool = False, pack_gate_up: bool = False) -> FusionResult:
    """Run ``target``'s pipeline on ``model`` in place; counts per produced op, only where nonzero.

    ``explain`` adds why each rule that matched nothing did not match (and why attention did not
    fuse when fewer than ``layers`` layers did).
    """
    counts: collections.Counter[str] = collections.Counter()
    modified = False
    rule_passes: list[RulePass] = []
    for step in pipeline(target, max_positions, pack_qkv, pack_gate_up):
        result = step(model)
        if isinstance(step, PackMatMulNBitsPass):  # counted by the Splits it made
            counts["Split"] += sum(count for kind, count in step.counts.items() if kind.endswith("+ Split"))
            modified = modified or result.modified
        # The clean-up passes only remove what these made unused: they do not count as a change.
        if isinstance(step, (RulePass, ConvertOpset)):
            counts.update(step.counts)
            modified = modified or result.modified
        if isinstance(step, RulePass):
            rule_passes.append(step)
    attention_layers = fused_attention_count(model)
    explanations = []
    if explain:
        for step in rule_passes:
            missing = {key for key, count in step.counts.items() if count == 0}
            if isinstance(step, FuseAttention) and attention_layers < layers:
                missing = set(step.counts)
            explanations += step.explain(model, missing)
    return FusionResult({key: count for key, count in counts.items() if count}, modified, attention_layers, explanations)


@dataclasses.dataclass(frozen=True)
class FuseConfig(StepConfig):
    """``graphopt fuse``'s parameters. ``tolerance`` bounds the max |logits diff| to the source, checked on
    ONNX Runtime's CPU provider (every fused op has a CPU kernel). ``pack_qkv`` and ``pack_gate_up`` lose
    the per-projection weight names, so prune and quantize with ``--exclude`` before them."""

    target: str = "cpu"
    require: bool = False
    explain: bool = False
    pack_qkv: bool = False
    pack_gate_up: bool = False
    validate: bool = True
    tolerance: float = 1e-3

    def __post_init__(self):
        if self.target not in TARGETS:
            raise GraphoptError(f"unknown fusion target {self.target!r}; choose from {', '.join(TARGETS)}")
        if self.pack_qkv and not TARGETS[self.target].contrib_ops:
            raise GraphoptError(f"packing q/k/v applies to GroupQueryAttention (targets cpu, cuda), not {self.target}")
        if not self.tolerance > 0:
            raise GraphoptError(f"the fusion tolerance must be positive, got {self.tolerance}")


class FuseStep(Step):
    """One fused attention op per layer, plus norm and GELU fusions, for a target."""

    name = "fuse"
    config_type = FuseConfig

    def refuse(self, source: ModelDir, config: FuseConfig) -> None:
        previous = source.manifest.fusion or {}
        if previous.get("contrib_ops") and not TARGETS[config.target].contrib_ops:
            raise GraphoptError(f"{source.path} is fused for {previous.get('target')} (ONNX Runtime contrib ops); "
                                f"fuse the plain export for {config.target} instead")

    def run(self, source: ModelDir, model: ir.Model, config: FuseConfig, work) -> StepOutput:
        manifest = source.manifest
        logger.info("fusing %s for %s", source.path, config.target)
        nodes_before = len(model.graph)
        result = fuse_model(model, config.target, manifest.layers, manifest.max_positions, explain=config.explain,
                            pack_qkv=config.pack_qkv, pack_gate_up=config.pack_gate_up)
        for line in result.explanations:
            logger.info("  explain: %s", line)
        if config.require and result.attention_layers < manifest.layers:
            raise GraphoptError(f"only {result.attention_layers} of {manifest.layers} attention layers fused for "
                                f"{config.target}" + ("" if config.explain else " (run with --explain to see why)"))
        changes: dict = {"opset": model.opset_imports.get("", manifest.opset)}
        if result.attention_layers:
            uses_gqa = any(node.op_type == "GroupQueryAttention" for node in model.graph)
            if uses_gqa and config.target == "cuda" and manifest.dtype == "float32":
                # ORT's CUDA GroupQueryAttention kernels are fp16/bf16 only.
                logger.info("  note: GroupQueryAttention has no float32 CUDA kernel, so these nodes would run on CPU; "
                            "convert it to float16 (graphopt convert) for CUDA")
            changes["fusion"] = {
                "target": config.target,
                "attention_op": next(f"{node.domain + '.' if node.domain else ''}{node.op_type}" for node in model.graph
                                     if node.op_type in ("GroupQueryAttention", "MultiHeadAttention", "Attention")),
                "contrib_ops": CONTRIB_DOMAIN in model.opset_imports,
                # GroupQueryAttention masks by length and takes positions from the cache length.
                "attention_mask": "right padding only" if uses_gqa else "any 0/1 mask",
                "position_ids": "must equal cache positions" if uses_gqa else "any",
                # GroupQueryAttention takes positions from the mask; a runtime need not feed them anew
                # when no node reads them (phi3's LongRoPE switch does).
                "reads_position_ids": any(value is not None and value.name == "position_ids"
                                          for node in model.graph for value in node.inputs),
                "max_positions": manifest.max_positions if uses_gqa else None,
            }
        figures = {"nodes_before": nodes_before, "nodes_after": len(model.graph),
                   "attention_layers": result.attention_layers}
        return StepOutput(model, result.counts, figures, result.modified, changes)

    def check(self, source: ModelDir, written: ModelDir, config: FuseConfig) -> dict:
        if not config.validate:
            return {}
        logger.info("validating the fused model against the source on CPU (prefill, decode, multi-token on cache)")
        figures = compare_logits(source.model_path, written.model_path, source.manifest.vocab_size)
        worst = figures["max_abs_logits_diff"]
        if worst > config.tolerance:
            raise ValidationError(f"fused model does not match its source: max |logits diff| {worst:.3g} > "
                                  f"{config.tolerance:g}")
        return {key: value for key, value in figures.items() if key.startswith("max_abs_logits_diff_")}


def fuse(model_dir: str | os.PathLike, output: str | os.PathLike, target: str = "cpu", force: bool = False,
         **parameters) -> tuple[ModelDir, dict[str, int]]:
    """Fuse MODEL_DIR for ``target`` into a new model directory at ``output`` (``parameters``: :class:`FuseConfig`).

    Returns the new directory and the counts per produced op.
    """
    record = run_step(FuseStep(), model_dir, output, FuseConfig(target=target, **parameters), force=force)
    return record.output, record.step.counts
