"""Draft models for speculative decoding, built from the target by draft recipes.

A draft recipe (``graphopt.recipes.DRAFT_RECIPES``) is a pipeline of registered steps like any
other recipe (``prune`` keeping some of the layers, ``quantize`` weight-only). ``build_draft(target,
output, "auto")`` builds every recipe of ``AUTO_CANDIDATES``, measures greedy speculative decoding
with each on calibration prompts, and keeps the fastest.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any

from graphopt.distill import DistillConfig, recipe_stage
from graphopt.errors import GraphoptError
from graphopt.modeldir import ModelDir, atomic_output, check_output
from graphopt.recipes import DRAFT_RECIPES, Stage, run_stage
from graphopt.runtime import Generator
from graphopt.runtime.speculative import SpeculativeGenerator

logger = logging.getLogger(__name__)

# What ``--recipe auto`` builds and measures. Dropping half the layers of SmolLM2-135M without
# retraining leaves ~6% greedy agreement, so untrained layer recipes are offered but not tried by
# default; ``distilled`` trains its quarter of the layers (``distill_minutes``; 0 leaves it out).
AUTO_CANDIDATES = ("int8", "int4", "distilled")

CALIBRATION_PROMPTS = (
    "The capital of France is",
    "Write a short story about a robot who learns to paint.",
    "Explain how a refrigerator works, step by step.",
    "def fibonacci(n):",
)


def _run_draft_stages(stages: tuple[Stage, ...], target: ModelDir, work: pathlib.Path, label: str,
                      distill_minutes: float | None) -> ModelDir:
    """The recipe's stages; a ``distill`` stage trains on the target as its teacher (``distill_minutes``
    replaces the recipe's budget)."""
    current = target
    for index, stage in enumerate(stages, start=1):
        logger.info("%s: [%d/%d] %s", label, index, len(stages), stage.describe())
        destination = work / f"{index:02d}-{stage.kind}"
        if stage.kind == "distill":
            parameters = dict(stage.parameters)
            if distill_minutes is not None:
                parameters["max_minutes"] = distill_minutes
            config = DistillConfig.from_parameters(parameters, where=f"draft recipe {label}: ")
            current, _ = recipe_stage(current.path, target.path, destination, config)
        else:
            current = run_stage(stage, current, destination).output
    return current


def build_recipe(target: ModelDir, output: pathlib.Path, recipe: str, force: bool = False,
                 distill_minutes: float | None = None) -> ModelDir:
    """Run ``DRAFT_RECIPES[recipe]`` on ``target`` into ``output`` (atomically)."""
    if recipe not in DRAFT_RECIPES:
        raise GraphoptError(f"unknown recipe {recipe!r}; choose from auto, {', '.join(DRAFT_RECIPES)}")
    with atomic_output(output, force=force, sources=[target.path]) as scratch, \
            tempfile.TemporaryDirectory(prefix=f".{scratch.name}.", dir=scratch.parent) as work:
        built = _run_draft_stages(DRAFT_RECIPES[recipe].stages, target, pathlib.Path(work), recipe, distill_minutes)
        scratch.rmdir()
        os.rename(built.path, scratch)
        ModelDir(scratch, built.manifest).update_extra(draft_of=str(target.path), draft_recipe=recipe)
    return ModelDir(output)


def measure(target: ModelDir, draft: ModelDir | None, prompts=CALIBRATION_PROMPTS, max_new_tokens: int = 32,
            ep: str = "cpu") -> dict[str, float]:
    """Greedy decode tokens/s (and acceptance) on ``prompts``; plain target decoding when ``draft`` is None."""
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
                ep: str = "cpu", distill_minutes: float | None = None) -> tuple[ModelDir, dict]:
    """Build a draft of ``target`` at ``output``; ``recipe="auto"`` keeps the fastest candidate.

    ``distill_minutes`` replaces the ``distilled`` recipe's training budget; 0 leaves that
    candidate out of ``auto``, which also skips it (with a log line) when the target cannot be
    trained (fused or quantized: distillation needs the float export).

    Returns:
        The draft directory and a report ``{"recipe": ..., "candidates": {name: figures}, "plain": ...}``.
    """
    target_dir = ModelDir.open(target)
    output = pathlib.Path(output)
    check_output(output, force, sources=[target_dir.path])
    if recipe != "auto":
        return build_recipe(target_dir, output, recipe, force=force, distill_minutes=distill_minutes), {"recipe": recipe}
    started = time.perf_counter()
    report: dict[str, Any] = {"candidates": {}}
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".draft-candidates.", dir=output.parent) as work:
        logger.info("measuring plain decoding of the target on calibration prompts")
        report["plain"] = measure(target_dir, None, ep=ep)
        best, best_speed = None, 0.0
        for name in AUTO_CANDIDATES:
            if name == "distilled":
                if distill_minutes == 0:
                    continue
                from graphopt.student import StudentError

                try:
                    candidate = build_recipe(target_dir, pathlib.Path(work) / name, name, distill_minutes=distill_minutes)
                except StudentError as error:
                    logger.info(f"distilled: not a candidate here ({error})")
                    continue
            else:
                candidate = build_recipe(target_dir, pathlib.Path(work) / name, name)
            figures = measure(target_dir, candidate, ep=ep)
            report["candidates"][name] = figures
            logger.info(f"{name}: {figures['decode_tokens_per_s']:.1f} tokens/s, acceptance "
                        f"{figures['acceptance_rate']:.2f} (plain {report['plain']['decode_tokens_per_s']:.1f})")
            if figures["decode_tokens_per_s"] > best_speed:
                best, best_speed = name, figures["decode_tokens_per_s"]
        report["recipe"] = best
        report["beats_plain"] = best_speed > report["plain"]["decode_tokens_per_s"]
        with atomic_output(output, force=force, sources=[target_dir.path]) as scratch:
            scratch.rmdir()
            shutil.copytree(pathlib.Path(work) / best, scratch)
            chosen = ModelDir(scratch)
            manifest = chosen.manifest
            manifest.lineage[-1].figures["auto"] = {"plain": report["plain"], "candidates": report["candidates"],
                                                    "seconds": round(time.perf_counter() - started, 1)}
            chosen.write_manifest(manifest)
    return ModelDir(output), report
