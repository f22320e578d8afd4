"""Draft models for speculative decoding, built from the target by recipes of steps.

A recipe is data: a named list of steps, each turning one model directory into another
(``keep_layers``, ``quantize``). ``build_draft(target, output, "auto")`` builds every recipe of
``AUTO_CANDIDATES``, measures greedy speculative decoding with each on calibration prompts, and
keeps the fastest. Every step is one of graphopt's own passes: layer steps use
``PruneLayersPass``, quantization steps ``graphopt.quantization`` (weight-only, MatMulNBits).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any, Callable


from graphopt import ir as graphopt_ir
from graphopt.errors import GraphoptError
from graphopt.modeldir import MODEL_FILE, ModelDir, atomic_output, derive

logger = logging.getLogger(__name__)

# Weight names of the norm at the entry of layer i, and of the final norm (llama/qwen2, gpt2).

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
        raise GraphoptError(f"unknown layer choice {where!r} (first or ends)")
    return set(range(layers)) - kept


# --- steps: model directory -> model directory --------------------------------------------------

def step_keep_layers(source: ModelDir, scratch: pathlib.Path, fraction: float = 0.5, where: str = "ends") -> dict:
    """Keep ``fraction`` of the layers (see :func:`layers_to_drop`) with graphopt's ``PruneLayersPass``."""
    from graphopt.export import io_names
    from graphopt.passes.prune_layers import PruneLayersPass

    layers = int(source.manifest["layers"])
    dropped = layers_to_drop(layers, round(layers * fraction), where)
    model = graphopt_ir.load(source.model_path)
    prune = PruneLayersPass(drop=sorted(dropped))
    prune(model)
    graphopt_ir.save(model, scratch / MODEL_FILE)
    remaining = layers - len(dropped)
    cache = dict(source.manifest.get("cache", {}))
    if isinstance(cache.get("kv_heads"), list):
        cache["kv_heads"] = [heads for index, heads in enumerate(cache["kv_heads"]) if index not in dropped]
    inputs, outputs = io_names(remaining)
    parameters = {"fraction": fraction, "where": where, "dropped": sorted(dropped)}
    derive(source, scratch, {"pass": "keep_layers", "parameters": parameters, "figures": prune.counts},
           layers=remaining, cache=cache, inputs=inputs, outputs=outputs)
    return prune.counts


def step_quantize(source: ModelDir, scratch: pathlib.Path, weights: str = "int4", head: str = "int8",
                  block_size: int = 32) -> dict:
    """Weight-only MatMuls with graphopt's own quantization pass (MatMulNBits, round to nearest).

    ``head`` sets the LM head's precision apart from the layers: its logits decide which token
    the draft proposes, so it is where low bits cost most acceptance.
    """
    from graphopt.quantization import QuantizeConfig, quantize

    config = QuantizeConfig(weights=weights, activations="none", head=head, block_size=block_size)
    quantized = quantize(source.path, scratch, config, force=True)
    return quantized.manifest["lineage"][-1]["figures"].get("counts", {})


STEPS: dict[str, Callable[..., dict]] = {
    "keep_layers": step_keep_layers,
    "quantize": step_quantize,
}


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)


# Each recipe's steps run in order; layer edits come before quantization because they address
# layers through the float graph's weight names, which quantization renames.
RECIPES: dict[str, list[Step]] = {
    "int8": [Step("quantize", {"weights": "int8"})],
    "int4": [Step("quantize", {"weights": "int4", "head": "int8"})],
    "half-layers": [Step("keep_layers", {"fraction": 0.5, "where": "ends"})],
    "half-layers-int4": [Step("keep_layers", {"fraction": 0.5, "where": "ends"}),
                         Step("quantize", {"weights": "int4", "head": "int8"})],
    "early-exit-int4": [Step("keep_layers", {"fraction": 0.5, "where": "first"}),
                        Step("quantize", {"weights": "int4", "head": "int8"})],
}
# What ``--recipe auto`` builds and measures. Dropping half the layers of SmolLM2-135M without
# retraining leaves ~6% greedy agreement, so layer recipes are offered but not tried by default.
AUTO_CANDIDATES = ("int8", "int4")

CALIBRATION_PROMPTS = (
    "The capital of France is",
    "Write a short story about a robot who learns to paint.",
    "Explain how a refrigerator works, step by step.",
    "def fibonacci(n):",
)


def build_recipe(target: ModelDir, output: pathlib.Path, recipe: str, force: bool = False,
                 progress: Callable[[str], None] = lambda message: None) -> ModelDir:
    """Run ``RECIPES[recipe]`` on ``target``; the last step writes ``output`` (atomically)."""
    if recipe not in RECIPES:
        raise GraphoptError(f"unknown recipe {recipe!r}; choose from auto, {', '.join(RECIPES)}")
    steps = RECIPES[recipe]
    with atomic_output(output, force=force) as scratch, tempfile.TemporaryDirectory(dir=scratch.parent) as work:
        source = target
        for index, step in enumerate(steps):
            progress(f"{recipe}: {step.name} {step.parameters or ''}".rstrip())
            destination = scratch if index == len(steps) - 1 else pathlib.Path(work) / f"step{index}"
            destination.mkdir(exist_ok=True)
            STEPS[step.name](source, destination, **step.parameters)
            source = ModelDir(destination)
        manifest = ModelDir(scratch).manifest
        manifest["draft_of"] = str(target.path)
        manifest["draft_recipe"] = recipe
        ModelDir(scratch).write_manifest(manifest)
    return ModelDir(output)


def measure(target: ModelDir, draft: ModelDir | None, prompts=CALIBRATION_PROMPTS, max_new_tokens: int = 32,
            ep: str = "cpu") -> dict[str, float]:
    """Greedy decode tokens/s (and acceptance) on ``prompts``; plain target decoding when ``draft`` is None."""
    from graphopt.runtime import Generator
    from graphopt.runtime.speculative import SpeculativeGenerator

    generator = Generator(target.path, ep=ep) if draft is None else SpeculativeGenerator(target.path, draft.path, ep=ep)
    generator.generate(generator.encode_prompt(prompts[0]), max_new_tokens=4)  # warm up both sessions
    tokens, seconds, proposed, accepted = 0, 0.0, 0, 0
    for prompt in prompts:
        result = generator.generate(generator.encode_prompt(prompt), max_new_tokens=max_new_tokens, stop_on_eos=False)
        tokens += len(result.token_ids) - 1
        seconds += result.decode_s
        proposed += result.extra.get("draft_tokens_proposed", 0)
        accepted += result.extra.get("draft_tokens_accepted", 0)
    return {"decode_tokens_per_s": tokens / seconds, "acceptance_rate": accepted / proposed if proposed else 0.0}


def build_draft(target: str | os.PathLike, output: str | os.PathLike, recipe: str = "auto", force: bool = False,
                ep: str = "cpu", progress: Callable[[str], None] = lambda message: None) -> tuple[ModelDir, dict]:
    """Build a draft of ``target`` at ``output``; ``recipe="auto"`` keeps the fastest candidate.

    Returns:
        The draft directory and a report ``{"recipe": ..., "candidates": {name: figures}, "plain": ...}``.
    """
    target_dir = ModelDir.open(target)
    output = pathlib.Path(output)
    from graphopt.modeldir import check_output

    check_output(output, force)
    if recipe != "auto":
        return build_recipe(target_dir, output, recipe, force=force, progress=progress), {"recipe": recipe}
    started = time.perf_counter()
    report: dict[str, Any] = {"candidates": {}}
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".draft-candidates.", dir=output.parent) as work:
        progress("measuring plain decoding of the target on calibration prompts")
        report["plain"] = measure(target_dir, None, ep=ep)
        best, best_speed = None, 0.0
        for name in AUTO_CANDIDATES:
            candidate = build_recipe(target_dir, pathlib.Path(work) / name, name, progress=progress)
            figures = measure(target_dir, candidate, ep=ep)
            report["candidates"][name] = figures
            progress(f"{name}: {figures['decode_tokens_per_s']:.1f} tokens/s, acceptance "
                     f"{figures['acceptance_rate']:.2f} (plain {report['plain']['decode_tokens_per_s']:.1f})")
            if figures["decode_tokens_per_s"] > best_speed:
                best, best_speed = name, figures["decode_tokens_per_s"]
        report["recipe"] = best
        report["beats_plain"] = best_speed > report["plain"]["decode_tokens_per_s"]
        with atomic_output(output, force=force) as scratch:
            scratch.rmdir()
            shutil.copytree(pathlib.Path(work) / best, scratch)
            chosen = ModelDir(scratch)
            manifest = chosen.manifest
            manifest["lineage"][-1].setdefault("figures", {})["auto"] = {
                "plain": report["plain"], "candidates": report["candidates"],
                "seconds": round(time.perf_counter() - started, 1)}
            chosen.write_manifest(manifest)
    return ModelDir(output), report
