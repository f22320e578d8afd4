"""`graphopt optimize`: a recipe's stages from checkpoint to a deployable, measured target and draft.

``optimize(src, output, recipe)`` runs the recipe (``graphopt.recipes``) stage by stage in a work
folder inside OUT's scratch directory. Every model it makes, the target with its draft, and the
reference tools (transformers' ``generate`` on a checkpoint SRC; with ``with_peers``,
onnxruntime.quantization's ``quantize_dynamic`` on the float export) are measured on one protocol,
which :func:`report_markdown` states. OUT (written atomically) gets ``target/`` and ``draft/``
(model directories), ``report.md``, ``report.json`` and ``report.png``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import platform
import shutil
import time
from typing import Any

from graphopt import checkpoint as checkpoint_lib
from graphopt import ir as graph_ir
from graphopt.distill import recipe_stage
from graphopt.drafting import build_draft
from graphopt.errors import GraphoptError, ValidationError
from graphopt.evaluate import DEFAULT_TEXT, evaluate, fitting_window, perplexity, read_text, text_windows
from graphopt.export import export
from graphopt.modeldir import MANIFEST_FILE, MODEL_FILE, ModelDir, atomic_output, check_output, derive
from graphopt.manifest import LineageStep
from graphopt.recipes import (MODEL_STAGES, STEPS, ExportStage, Recipe, ValidateStage, check_order, check_parameters,
                              get_recipe, run_stage)
from graphopt.runtime.speculative import SpeculativeGenerator
from graphopt.runtime.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

PROMPT = "Write a short paragraph about the history of Paris."
# The validate stage's answers-kept prompts (tools/bench_int4.py measures these and 24 more).
ANSWER_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a neural network is in two sentences.",
    "Give me three tips for staying focused while studying.",
    "How do I make a cup of tea?",
    "What is the difference between weather and climate?",
    "Summarize the plot of Romeo and Juliet.",
    "Why is the sky blue?",
)


@dataclasses.dataclass(frozen=True)
class MeasureSettings:
    """How every model is measured; written into the report."""

    tokens: int = 64
    eval_windows: int = 4
    window: int = 512
    ep: str = "cpu"
    reference_tools: bool = True
    with_peers: bool = False


# --- the pipeline's own stages (the model stages are registered steps, see graphopt.recipes) ------


def export_stage(src: str, destination: pathlib.Path, config: ExportStage) -> ModelDir:
    if is_model_dir(src):
        directory = ModelDir.open(src)
        if directory.manifest.dtype != "float32" or directory.manifest.quantization:
            raise GraphoptError(f"{src}: optimize starts from a float32 model directory or a checkpoint")
        logger.info("using the model directory %s as the export", directory.path)
        return directory
    return export(src, destination, run_validation=True, opset=config.opset)


def validate_stage(target: dict, reference: dict, config: ValidateStage, answers_kept: float) -> dict:
    """Check the target's measurements (and :func:`answers_kept`) against the float32 export's.

    Raises:
        ValidationError: a bound is missed (nothing is written to OUT).
    """
    increase = 100.0 * (target["perplexity"] / reference["perplexity"] - 1.0)
    figures = {"token_agreement": target["token_agreement"], "perplexity_increase_percent": round(increase, 3),
               "answers_kept": answers_kept, "provider": target["provider"]}
    measured = (f"token agreement with float32 {target['token_agreement']:.1%}, perplexity {target['perplexity']:.3f} "
                f"vs {reference['perplexity']:.3f} ({increase:+.1f}%), answers kept {answers_kept:.1f} tokens")
    for failed, reason in (
            (answers_kept < config.min_answers_kept, f"answers kept below the recipe's {config.min_answers_kept:g} tokens"),
            (target["token_agreement"] < config.min_token_agreement,
             f"agreement below the recipe's {config.min_token_agreement:.0%}"),
            (increase > config.max_perplexity_increase,
             f"perplexity increase over the recipe's {config.max_perplexity_increase}%")):
        if failed:
            raise ValidationError(f"target fails validation: {measured}; {reason}")
    logger.info("validated: token agreement %.1f%%, perplexity %+.2f%%, answers kept %.1f tokens",
                100 * target["token_agreement"], increase, answers_kept)
    return figures


def answers_kept(directory: ModelDir, reference: ModelDir, settings: MeasureSettings) -> float:
    """Mean index of the first greedy token where ``directory``'s answer to each of ``ANSWER_PROMPTS``
    (``settings.tokens`` tokens, EOS ignored) leaves ``reference``'s (``settings.tokens`` when it never does).

    Teacher-forced agreement on prose misses what users see: a near-tie flipped early changes the
    whole answer (an int8 SmolLM2 answered "What is the capital of France?" with "L'Étoile" at 94%
    agreement on prose)."""
    answers, expected = (greedy_answers(model.path, ANSWER_PROMPTS, settings.tokens, settings.ep)
                         for model in (directory, reference))
    kept = [kept_tokens(answer, reference_answer) for answer, reference_answer in zip(answers, expected)]
    return sum(kept) / len(kept)


def greedy_answers(model_dir: str | os.PathLike, prompts, tokens: int, ep: str = "cpu") -> list[list[int]]:
    """The model's greedy answers to chat ``prompts``, ``tokens`` each (EOS ignored)."""
    from graphopt.runtime import Generator

    generator = Generator(model_dir, ep=ep)
    return [generator.generate(generator.encode_prompt(prompt, chat=True), max_new_tokens=tokens,
                               stop_on_eos=False).token_ids for prompt in prompts]


def kept_tokens(answer: list[int], reference: list[int]) -> int:
    """How many tokens ``answer`` keeps of ``reference``: the index of the first that differs (the
    shorter length when none does)."""
    return next((index for index, (a, b) in enumerate(zip(answer, reference)) if a != b), min(len(answer), len(reference)))


# --- measuring ------------------------------------------------------------------------------


def is_model_dir(src: str) -> bool:
    path = pathlib.Path(src)
    return path.is_dir() and (path / MODEL_FILE).is_file() and (path / MANIFEST_FILE).is_file()


def logical_parameters(model_path: pathlib.Path) -> int:
    """Weights as the float model counts them: packed 4/8-bit MatMulNBits weights count K x N, scales not."""
    model = graph_ir.load(model_path)
    skipped: set[str] = set()
    count = 0
    for node in model.graph:
        if node.op_type == "MatMulNBits":
            count += node.attributes["K"].as_int() * node.attributes["N"].as_int()
            skipped.update(value.name for value in node.inputs[1:] if value is not None)
        elif node.op_type == "DequantizeLinear":
            skipped.update(value.name for value in node.inputs[1:] if value is not None)
    for name, value in model.graph.initializers.items():
        if name not in skipped and value.shape is not None:
            count += math.prod(value.shape.numpy())
    return int(count)


def measure_model(directory: ModelDir, reference: ModelDir | None, settings: MeasureSettings) -> dict[str, Any]:
    """Size, parameters, decode tokens/s, prefill ms, perplexity and token agreement of one model."""
    from graphopt.runtime import Generator

    generator = Generator(directory.path, ep=settings.ep)
    prompt_ids, run = _timed_decode(generator, settings)
    window = fitting_window(directory, settings.window)
    logger.info("  perplexity over %d windows of %d tokens%s", settings.eval_windows, window,
                " with agreement against float32" if reference is not None else "")
    quality = evaluate(directory.path, DEFAULT_TEXT, window=window, max_windows=settings.eval_windows,
                       reference_dir=reference.path if reference is not None else None, ep=settings.ep)
    return {"size_bytes": directory.size_bytes(), "parameters": logical_parameters(directory.model_path),
            "decode_tokens_per_s": run.decode_tokens_per_s, "prefill_ms": run.prefill_ms,
            "prompt_tokens": len(prompt_ids), "perplexity": quality.perplexity,
            "token_agreement": 1.0 if reference is None else quality.token_agreement,
            "eval_tokens": quality.tokens, "provider": generator.provider, "token_ids": run.token_ids}


def _timed_decode(generator, settings: MeasureSettings):
    """The prompt's ids and a greedy run of ``settings.tokens``, after a warm-up run (first-run allocations)."""
    prompt_ids = generator.encode_prompt(PROMPT, chat=True)
    generator.generate(prompt_ids, max_new_tokens=4, stop_on_eos=False)
    return prompt_ids, generator.generate(prompt_ids, max_new_tokens=settings.tokens, stop_on_eos=False)


def measure_pair(target: ModelDir, draft: ModelDir, settings: MeasureSettings) -> dict[str, Any]:
    """Greedy speculative decoding of the target with its draft, same prompt and length as the stages."""
    _, run = _timed_decode(SpeculativeGenerator(target.path, draft.path, ep=settings.ep), settings)
    return {"decode_tokens_per_s": run.decode_tokens_per_s, "prefill_ms": run.prefill_ms,
            "acceptance_rate": run.extra.get("acceptance_rate"), "token_ids": run.token_ids}


def measure_transformers(src: str, reference: ModelDir, settings: MeasureSettings) -> dict[str, Any]:
    """transformers' generate (greedy, same prompt and length) and a PyTorch perplexity on the same windows."""
    import torch
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the GGUF loader's bar would break the progress lines
    model = checkpoint_lib.load(src).model.eval()
    tokenizer = Tokenizer(reference.path)
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}]))
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False)
        prefill_s = time.perf_counter() - started
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=settings.tokens, min_new_tokens=settings.tokens, do_sample=False)
        total_s = time.perf_counter() - started
        window = fitting_window(reference, settings.window)
        windows = text_windows(tokenizer.encode(read_text(DEFAULT_TEXT)), window, settings.eval_windows)
        logger.info("  PyTorch perplexity over %d windows of %d tokens", len(windows), window)
        torch_perplexity = perplexity(
            lambda ids: torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].double(), -1).numpy(), windows)
    return {"decode_tokens_per_s": (settings.tokens - 1) / max(total_s - prefill_s, 1e-9),
            "prefill_ms": prefill_s * 1e3, "perplexity": torch_perplexity,
            "parameters": sum(parameter.numel() for parameter in model.parameters()), "provider": "torch CPU"}


def ort_quantize_dynamic(reference: ModelDir, destination: pathlib.Path) -> ModelDir:
    """The peer: onnxruntime.quantization.quantize_dynamic (int8 per-tensor weights) on the float export."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    destination.mkdir(parents=True)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it logs a pre-processing hint through the root logger
    try:
        # per_channel=False: with per-channel weights (MatMulInteger) onnxruntime 1.32 gives SmolLM2-135M
        # a perplexity over 1e6 on graphopt's export; per-tensor gives ~32 on one 512-token window.
        quantize_dynamic(str(reference.model_path), str(destination / MODEL_FILE), per_channel=False,
                         weight_type=QuantType.QInt8, use_external_data_format=True)
    finally:
        root.setLevel(level)
    derive(reference, destination, LineageStep("onnxruntime.quantization.quantize_dynamic",
                                               {"per_channel": False, "weight_type": "QInt8"}))
    return ModelDir(destination)


# --- the pipeline ---------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One line of the report: a stage's model, the speculative pair, or a reference tool."""

    label: str
    kind: str  # "stage", "pair" or "reference"
    figures: dict[str, Any]
    notes: str = ""


def optimize(src: str, output: str | os.PathLike, recipe: str, force: bool = False,
             settings: MeasureSettings | None = None, keep_draft: bool = False) -> pathlib.Path:
    """Run ``recipe`` on SRC (a checkpoint, registry name or float32 model directory) into OUT.

    A draft whose pair with the target decodes slower than the target alone is measured and
    reported but not written to OUT (``keep_draft`` writes it anyway). Returns OUT's path.
    Raises GraphoptError for a bad recipe before any work, and lets any
    stage's error through after removing the scratch directory (OUT is left as it was).
    """
    chosen = get_recipe(recipe)
    check_order(chosen)
    check_parameters(chosen)
    settings = dataclasses.replace(settings or MeasureSettings(), ep=chosen.ep)
    check_output(output, force, sources=[src])
    if not is_model_dir(src) and pathlib.Path(src).is_dir() and not (pathlib.Path(src) / "config.json").exists():
        raise GraphoptError(f"{src}: neither a graphopt model directory nor a checkpoint directory")
    started = time.perf_counter()
    with atomic_output(output, force=force, sources=[src]) as scratch:
        work = scratch / ".stages"
        work.mkdir()
        measured: dict[pathlib.Path, dict] = {}
        models: dict[str, ModelDir] = {}

        def measure(directory: ModelDir) -> dict:
            if directory.path not in measured:
                reference = models.get("export")
                reference = None if reference is None or reference.path == directory.path else reference
                measured[directory.path] = measure_model(directory, reference, settings)
            return measured[directory.path]

        current: ModelDir | None = None
        rows: list[Row] = []
        stage_figures: list[dict] = []
        for index, stage in enumerate(chosen.stages, start=1):
            logger.info("[%d/%d] %s", index, len(chosen.stages), stage.describe())
            stage_started = time.perf_counter()
            destination = work / f"{index:02d}-{stage.kind}"
            figures: dict = {}
            if stage.kind in STEPS:
                record = run_stage(stage, current, destination)
                current, figures = record.output, dict(record.step.counts)
                if record.step.figures.get("packed"):
                    figures["packed"] = record.step.figures["packed"]
            elif stage.kind == "export":
                current = export_stage(src, destination, stage.config())
                figures = {"given": True} if current.path != destination else {}
            elif stage.kind == "distill":
                current, figures = recipe_stage(current.path, models["export"].path, destination,
                                                stage.config())
            elif stage.kind == "validate":
                logger.info("[%d/%d] answers kept: greedy answers of the target and the export to %d chat prompts",
                            index, len(chosen.stages), len(ANSWER_PROMPTS))
                figures = validate_stage(measure(current), measure(models["export"]), stage.config(),
                                         answers_kept(current, models["export"], settings))
            elif stage.kind == "draft":
                config = stage.config()
                if config.source not in models:
                    raise GraphoptError(f"recipe {chosen.name}: draft source {config.source!r} is not an earlier stage")
                draft, report = build_draft(models[config.source].path, scratch / "draft", recipe=config.recipe,
                                            ep=chosen.ep)
                figures = {"draft_recipe": report.get("recipe", config.recipe)}
                models["draft"] = draft
                logger.info("[%d/%d] measuring the draft and the target+draft pair", index, len(chosen.stages))
                rows.append(Row(f"draft ({figures['draft_recipe']})", "stage", measure(draft), notes="draft alone"))
                pair = measure_pair(current, draft, settings)
                plain = measure(current)
                pair["identical_to_target_greedy"] = pair["token_ids"] == plain["token_ids"]
                pair["first_divergence"] = _first_divergence(pair["token_ids"], plain["token_ids"])
                pair["draft_shipped"] = keep_draft or pair["decode_tokens_per_s"] > plain["decode_tokens_per_s"]
                if not pair["draft_shipped"]:
                    logger.info("the draft is not written: target + draft decoded %.1f tokens/s, the target alone "
                                "%.1f (--keep-draft writes it anyway)", pair["decode_tokens_per_s"],
                                plain["decode_tokens_per_s"])
                    shutil.rmtree(draft.path)
                rows.append(Row("target + draft (speculative)", "pair", pair, notes=_pair_note(pair, settings.tokens)))
            stage_figures.append({"stage": stage.describe(), "seconds": round(time.perf_counter() - stage_started, 1),
                                  "figures": figures})
            if stage.kind in MODEL_STAGES:
                models.setdefault(stage.kind, current)
                logger.info("[%d/%d] measuring %s", index, len(chosen.stages), stage.kind)
                rows.append(Row(stage.kind, "stage", measure(current), notes=_counts_note(figures)))
        target = scratch / "target"
        _place_target(current, target, work)
        rows += reference_rows(src, models["export"], work, settings)
        shutil.rmtree(work)
        report = {"recipe": chosen.name, "src": src, "ep": settings.ep, "settings": dataclasses.asdict(settings),
                  "machine": machine(), "stages": stage_figures,
                  "rows": [{"label": row.label, "kind": row.kind, "notes": row.notes,
                            **{key: value for key, value in row.figures.items() if key != "token_ids"}} for row in rows],
                  "seconds": round(time.perf_counter() - started, 1)}
        (scratch / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (scratch / "report.md").write_text(report_markdown(chosen, settings, rows, report))
        plot(rows, scratch / "report.png", f"{chosen.name}: decode speed vs perplexity ({machine()['short']})")
        ModelDir(target).update_extra(optimize={"recipe": chosen.name, "ep": chosen.ep,
                                                "stages": [stage.describe() for stage in chosen.stages]})
        logger.info("report: %s", pathlib.Path(output) / "report.md")
    return pathlib.Path(output)


def _pair_note(figures: dict, tokens: int) -> str:
    note = f"acceptance {figures.get('acceptance_rate', 0) or 0:.2f}; output identical to the target's greedy: "
    if figures["identical_to_target_greedy"]:
        note += "yes"
    else:
        # Measured on SmolLM2 int8: GroupQueryAttention's multi-token path sums in another order
        # (1e-7 apart after layer 0); MatMulNBits' int8 input rounding grows that to ~1 logit
        # by the output (float32 target: 3e-5), enough to flip a near-tie.
        note += (f"no, from token {figures['first_divergence']} of {tokens} (the multi-token verify rounds a "
                 "quantized target's activations differently from one-token steps; decode with the target alone "
                 "where exact greedy output matters)")
    if not figures["draft_shipped"]:
        note += "; slower than the target alone: draft/ not written"
    return note


def _first_divergence(tokens: list[int], reference: list[int]) -> int | None:
    """Index of the first token where ``tokens`` leaves ``reference``; None when they are equal."""
    return None if tokens == reference else kept_tokens(tokens, reference)


def _counts_note(figures: dict) -> str:
    note = ", ".join(f"{key} {value}" for key, value in figures.items() if isinstance(value, int) and not isinstance(value, bool))
    packed = figures.get("packed")
    if packed:  # what the node counts above became: the graph holds fewer MatMulNBits than were quantized
        note += "; packed: " + ", ".join(f"{key} {value}" for key, value in packed.items())
    return note


def _place_target(current: ModelDir, target: pathlib.Path, work: pathlib.Path) -> None:
    """Move the last stage's model to OUT/target (a copy when it is SRC itself, outside the work folder)."""
    if work in current.path.parents:
        os.rename(current.path, target)
    else:
        shutil.copytree(current.path, target)


def reference_rows(src: str, export: ModelDir, work: pathlib.Path, settings: MeasureSettings) -> list[Row]:
    rows = []
    checkpoint = reference_checkpoint(src)
    if settings.reference_tools and checkpoint is not None:
        logger.info("measuring transformers generate on %s (reference)", checkpoint)
        try:
            rows.append(Row("transformers generate (fp32)", "reference",
                            measure_transformers(checkpoint, export, settings)))
        except (ImportError, GraphoptError) as error:
            logger.info("  skipped: %s", error)
    if settings.with_peers:
        logger.info("peer: onnxruntime.quantization.quantize_dynamic on the float export")
        peer = ort_quantize_dynamic(export, work / "peer-quantize-dynamic")
        rows.append(Row("ORT quantize_dynamic (int8)", "reference",
                        measure_model(peer, export, settings)))
    return rows


def reference_checkpoint(src: str) -> str | None:
    """The checkpoint transformers can load for SRC: SRC itself, or the source a model directory was exported from."""
    if not is_model_dir(src):
        return src
    source = ModelDir.open(src).manifest.source
    if source.get("path") and pathlib.Path(source["path"]).exists():
        return str(source["path"])
    return source.get("name") if source.get("kind") == "registry" else None


def machine() -> dict[str, str]:
    import onnxruntime

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"platform": f"{platform.machine()} {os.cpu_count()} cores", "onnxruntime": onnxruntime.__version__,
            "load_average_1min": f"{load:.1f}", "short": f"{platform.machine()}, {os.cpu_count()} cores, load {load:.1f}"}


def report_markdown(recipe: Recipe, settings: MeasureSettings, rows: list[Row], report: dict) -> str:
    window_note = f"{settings.eval_windows} windows of up to {settings.window} tokens"
    lines = [
        f"# graphopt optimize: {recipe.name}",
        "",
        f"Source: `{report['src']}`. Recipe: {recipe.description}.",
        "",
        f"Machine: {report['machine']['platform']}, onnxruntime {report['machine']['onnxruntime']}, "
        f"1-minute load average {report['machine']['load_average_1min']} when the report was written "
        "(shared machines give noisy speeds).",
        "",
        f"Decode: greedy, {settings.tokens} new tokens after a fixed chat prompt, EOS ignored, one warm-up run; "
        f"provider as listed. Perplexity: graphopt/data/eval-gpl3.txt, {window_note} (graphopt eval's protocol); "
        "agreement: teacher-forced greedy next-token agreement with the float32 export on the same windows.",
        "",
        "| model | size MB | parameters M | decode tok/s | prefill ms | perplexity | agreement | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        figures = row.figures
        notes = row.notes
        if figures.get("provider") and figures["provider"] not in ("CPUExecutionProvider", "torch CPU"):
            notes = f"{notes}; {figures['provider']}".lstrip("; ")
        elif recipe.ep != "cpu" and figures.get("provider") == "CPUExecutionProvider":
            notes = f"{notes}; ran on CPU ({recipe.ep} not available here)".lstrip("; ")
        label = f"*{row.label}*" if row.kind == "reference" else row.label
        lines.append(f"| {label} | {_fmt(figures.get('size_bytes'), 1e-6, 1)} | {_fmt(figures.get('parameters'), 1e-6, 1)} "
                     f"| {_fmt(figures.get('decode_tokens_per_s'), 1, 1)} | {_fmt(figures.get('prefill_ms'), 1, 1)} "
                     f"| {_fmt(figures.get('perplexity'), 1, 3)} | {_fmt(figures.get('token_agreement'), 100, 1, '%')} "
                     f"| {notes} |")
    if any(row.kind == "reference" for row in rows):
        lines += ["", "Reference tools (in italics) ran on the same machine in the same run."]
    lines += ["", "## Stages", ""]
    for stage in report["stages"]:
        lines.append(f"- `{stage['stage']}`: {stage['seconds']} s"
                     + (f"; {json.dumps(stage['figures'])}" if stage["figures"] else ""))
    lines += ["", f"Total: {report['seconds']} s.", ""]
    return "\n".join(lines)


def _fmt(value, scale: float, digits: int, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value * scale:.{digits}f}{suffix}"


def plot(rows: list[Row], path: pathlib.Path, title: str) -> None:
    """Decode tokens/s (x) against perplexity (y): stages joined in order, references as diamonds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    stages = [row for row in rows if row.kind == "stage" and not row.label.startswith("draft")]
    if stages:
        axes.plot([row.figures["decode_tokens_per_s"] for row in stages], [row.figures["perplexity"] for row in stages],
                  "o-", color="tab:blue", label="graphopt stages")
    for row in rows:
        speed, perplexity = row.figures.get("decode_tokens_per_s"), row.figures.get("perplexity")
        if row.kind == "pair":
            # Speculative decoding produces the target's tokens: the target's perplexity.
            perplexity = stages[-1].figures["perplexity"] if stages else None
        if speed is None or perplexity is None:
            continue
        style = {"reference": ("D", "tab:red"), "pair": ("*", "tab:green"), "stage": ("o", "tab:blue")}[row.kind]
        if row.label.startswith("draft"):
            style = ("s", "tab:gray")
        axes.plot([speed], [perplexity], style[0], color=style[1], markersize=9 if row.kind == "pair" else 6)
        axes.annotate(row.label, (speed, perplexity), textcoords="offset points", xytext=(5, 4), fontsize=8)
    axes.set_xlabel("decode tokens/s (higher is better)")
    axes.set_ylabel("perplexity (lower is better)")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def table(report_path: pathlib.Path) -> str:
    """The report's table, for the CLI to print at the end."""
    text = report_path.read_text()
    return "\n".join(line for line in text.splitlines() if line.startswith("|"))
