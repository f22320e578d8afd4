"""Fusion pipelines per target (as data) and ``fuse()``, which the CLI and ``export --fuse`` call.

A target names where the model will run and so which fused ops it may use:

* ``cpu``, ``cuda``: ONNX Runtime contrib ops (GroupQueryAttention / MultiHeadAttention,
  Skip(Simplified)LayerNormalization, FastGelu); the graph is the same for both, the ops have CPU
  and CUDA kernels;
* ``tensorrt``, ``onnx``: standard ONNX only, opset 23 (Attention, RotaryEmbedding, RMSNormalization,
  Gelu), so any
  runtime implementing ONNX can run the model.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Callable

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from graphopt import ir as graph_ir
from graphopt.errors import GraphoptError, ValidationError
from graphopt.modeldir import MODEL_FILE, ModelDir, atomic_output, derive
from graphopt.passes._rule_pass import RulePass
from graphopt.passes.fuse_attention import CONTRIB_DOMAIN, FuseAttention, fused_attention_count
from graphopt.passes.fuse_gelu import FuseGelu
from graphopt.passes.fuse_norm import FuseNormalization
from graphopt.passes.fuse_rotary import FuseRotaryEmbedding

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    contrib_ops: bool  # may use ONNX Runtime's com.microsoft ops
    opset: int | None  # the default-domain opset the target's fused ops need, if above the export's


TARGETS = {
    "cpu": Target("cpu", contrib_ops=True, opset=None),
    "cuda": Target("cuda", contrib_ops=True, opset=None),
    "tensorrt": Target("tensorrt", contrib_ops=False, opset=23),
    "onnx": Target("onnx", contrib_ops=False, opset=23),
}


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


def pipeline(target: str, max_positions: int | None, pack_qkv: bool = False) -> list[ir.passes.PassBase]:
    """The passes for ``target``, in order. ``max_positions`` sizes the rotary caches of GQA;
    ``pack_qkv`` makes GQA's query, key and value projections one MatMul."""
    if target not in TARGETS:
        raise GraphoptError(f"unknown fusion target {target!r}; choose from {', '.join(TARGETS)}")
    spec = TARGETS[target]
    passes: list[ir.passes.PassBase] = []
    if spec.opset:
        # First: Attention and RMSNormalization exist only from opset 23, the rules check for it.
        passes.append(ConvertOpset(spec.opset))
    # Attention first: the GroupQueryAttention pattern includes the RoPE ops, so the rotary
    # rule (standard targets only) must not take them before it. Norm and GELU patterns never
    # overlap attention; their order is only for readable logs.
    passes.append(FuseAttention(target, max_positions=max_positions, pack_qkv=pack_qkv))
    if not spec.contrib_ops:
        passes.append(FuseRotaryEmbedding())
    passes += [
        FuseNormalization(target),
        FuseGelu(target),
        # The mask and rotary subgraphs the fused ops no longer read; the rewriter inserts new
        # nodes at the match root, so sort to keep the graph topologically ordered.
        RemoveUnusedNodesPass(),
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
               explain: bool = False, pack_qkv: bool = False) -> FusionResult:
    """Run ``target``'s pipeline on ``model`` in place; counts per produced op, only where nonzero.

    ``explain`` adds why each rule that matched nothing did not match (and why attention did not
    fuse when fewer than ``layers`` layers did).
    """
    counts: dict[str, int] = {}
    modified = False
    rule_passes: list[RulePass] = []
    for step in pipeline(target, max_positions, pack_qkv):
        result = step(model)
        if isinstance(step, RulePass):
            rule_passes.append(step)
            for key, count in step.counts.items():
                counts[key] = counts.get(key, 0) + count
            modified = modified or result.modified
        elif isinstance(step, ConvertOpset):
            modified = modified or result.modified
    attention_layers = fused_attention_count(model)
    explanations = []
    if explain:
        for step in rule_passes:
            missing = {key for key, count in step.counts.items() if count == 0}
            if isinstance(step, FuseAttention) and attention_layers < layers:
                missing = set(step.counts)
            explanations += step.explain(model, missing)
    return FusionResult({key: count for key, count in counts.items() if count}, modified, attention_layers, explanations)


def _max_logits_diff(reference: os.PathLike, fused: os.PathLike, vocab_size: int, seed: int = 0) -> dict[str, float]:
    """Prefill 8 random tokens, decode 1, then a 3-token forward on the cache: max |logits diff| each."""
    from graphopt.runtime.decoder import Decoder

    ids = np.random.default_rng(seed).integers(0, vocab_size, size=12).tolist()
    outputs = []
    for path in (reference, fused):
        decoder = Decoder(path, ep="cpu")
        outputs.append([decoder.forward(ids[:8]), decoder.forward(ids[8:9]), decoder.forward(ids[9:12])])
    return {f"max_abs_logits_diff_{label}": float(np.abs(a - b).max())
            for label, a, b in zip(("prefill", "decode", "multi_token"), *outputs)}


def fuse(model_dir: str | os.PathLike, output: str | os.PathLike, target: str, require: bool = False,
         explain: bool = False, force: bool = False, validate: bool = True, tolerance: float = 1e-3,
         pack_qkv: bool = False, progress: Callable[[str], None] = lambda message: None
         ) -> tuple[ModelDir, dict[str, int]]:
    """Fuse MODEL_DIR for ``target`` into a new model directory at ``output``; returns it and the counts.

    ``pack_qkv`` (GroupQueryAttention targets) concatenates the query, key and value projection
    weights into one MatMul: fewer kernel launches per layer, which matters on a GPU; prune and
    quantize with ``--exclude`` before it, since the packed weight loses the per-projection names.

    Validation runs the fused and the source model on ONNX Runtime's CPU provider (every fused op
    has a CPU kernel). Nothing is written at ``output`` unless every step succeeds.

    Raises:
        GraphoptError: unknown target, or ``require`` and fewer attention layers fused than the
            model has.
        ValidationError: fused logits differ from the source's by more than ``tolerance``.
    """
    if target not in TARGETS:
        raise GraphoptError(f"unknown fusion target {target!r}; choose from {', '.join(TARGETS)}")
    if pack_qkv and not TARGETS[target].contrib_ops:
        raise GraphoptError(f"packing q/k/v applies to GroupQueryAttention (targets cpu, cuda), not {target}")
    source = ModelDir.open(model_dir)
    manifest = source.manifest
    layers = int(manifest.get("layers", 0))
    previous = manifest.get("fusion") or {}
    if previous.get("contrib_ops") and not TARGETS[target].contrib_ops:
        raise GraphoptError(f"{source.path} is fused for {previous.get('target')} (ONNX Runtime contrib ops); "
                            f"fuse the plain export for {target} instead")
    started = time.perf_counter()
    progress(f"fusing {source.path} for {target}")
    model = graph_ir.load(source.model_path)
    nodes_before = len(model.graph)
    result = fuse_model(model, target, layers, manifest.get("max_positions"), explain=explain, pack_qkv=pack_qkv)
    for line in result.explanations:
        progress(f"  explain: {line}")
    if require and result.attention_layers < layers:
        raise GraphoptError(f"only {result.attention_layers} of {layers} attention layers fused for {target}"
                            + ("" if explain else " (run with --explain to see why)"))
    with atomic_output(output, force=force) as scratch:
        graph_ir.save(model, scratch / MODEL_FILE)
        figures: dict[str, float | int] = {"nodes_before": nodes_before, "nodes_after": len(model.graph),
                                           "attention_layers": result.attention_layers}
        if validate:
            progress("validating the fused model against the source on CPU (prefill, decode, multi-token on cache)")
            figures.update(_max_logits_diff(source.model_path, scratch / MODEL_FILE, int(manifest.get("vocab_size", 100))))
            worst = max(value for key, value in figures.items() if key.startswith("max_abs"))
            if worst > tolerance:
                raise ValidationError(f"fused model does not match its source: max |logits diff| {worst:.3g} > {tolerance:g}")
        step = {"pass": "fuse", "parameters": {"target": target, "require": require, "validate": validate,
                                               "tolerance": tolerance, "pack_qkv": pack_qkv},
                "counts": result.counts, "modified": result.modified, "figures": figures,
                "seconds": round(time.perf_counter() - started, 1)}
        updates = {"opset": model.opset_imports.get("", manifest.get("opset"))}
        if result.attention_layers:
            uses_gqa = any(node.op_type == "GroupQueryAttention" for node in model.graph)
            if uses_gqa and target == "cuda" and manifest.get("dtype", "float32") == "float32":
                # ORT's CUDA GroupQueryAttention kernels are fp16/bf16 only.
                progress("  note: GroupQueryAttention has no float32 CUDA kernel, so these nodes would run on CPU; "
                         "convert it to float16 (graphopt convert) for CUDA")
            updates["fusion"] = {
                "target": target,
                "attention_op": next(f"{node.domain + '.' if node.domain else ''}{node.op_type}" for node in model.graph
                                     if node.op_type in ("GroupQueryAttention", "MultiHeadAttention", "Attention")),
                "contrib_ops": CONTRIB_DOMAIN in model.opset_imports,
                # GroupQueryAttention masks by length and takes positions from the cache length.
                "attention_mask": "right padding only" if uses_gqa else "any 0/1 mask",
                "position_ids": "must equal cache positions" if uses_gqa else "any",
                "max_positions": manifest.get("max_positions") if uses_gqa else None,
            }
        derive(source, scratch, step, **updates)
    return ModelDir(output), result.counts
