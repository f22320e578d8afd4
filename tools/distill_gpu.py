"""Distillation on a GPU machine: heal the 25%-pruned SmolLM2, and int4 QAT, measured on eval-gpl3.

Stages (each one command; the GPU machine keeps WORK between commands while it stays warm):

    python tools/distill_gpu.py plan --teacher smollm2 --student smollm2-p25 --out plan.json     (here)
    python tools/distill_gpu.py prepare --src SmolLM2.gguf --plan plan.json --work WORK --out OUT
    python tools/distill_gpu.py heal --work WORK --out OUT --minutes 8
    python tools/distill_gpu.py qat --work WORK --out OUT --minutes 7

``plan`` reads which MLP channels / heads / layers the local pruned model kept (by matching its
weights to the teacher's), so the GPU machine rebuilds exactly that student from the GGUF without
shipping 400 MB of weights. ``prepare`` exports, prunes by the plan, samples the teacher's data
pool on the GPU and measures the baselines (fp32, pruned, post-training int4 RTN and GPTQ).
Every stage prints a table last and writes its figures (JSON) and loss curves (PNG) to OUT.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

QUESTION = "What is the capital of France?"
WINDOWS = 4


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def plan(args) -> None:
    """Kept heads / channels / layers of ``student`` relative to ``teacher`` (both model directories)."""
    import onnx_ir as ir

    teacher = ir.load(str(pathlib.Path(args.teacher) / "model.onnx")).graph.initializers
    student_dir = pathlib.Path(args.student)
    student = ir.load(str(student_dir / "model.onnx")).graph.initializers
    manifest = json.loads((student_dir / "graphopt.json").read_text())
    kept = manifest["lineage"][-1]["figures"].get("kept_layers")
    head_dim = manifest["head_dim"]
    channels, heads = {}, {}
    for new, old in enumerate(kept):
        ours = student[f"model.layers.{new}.mlp.up_proj.weight"].const_value.numpy()
        theirs = teacher[f"model.layers.{old}.mlp.up_proj.weight"].const_value.numpy()
        if ours.shape != theirs.shape:
            lookup = {theirs[:, column].tobytes(): column for column in range(theirs.shape[1])}
            channels[old] = [lookup[ours[:, column].tobytes()] for column in range(ours.shape[1])]
        ours = student[f"model.layers.{new}.self_attn.q_proj.weight"].const_value.numpy()
        theirs = teacher[f"model.layers.{old}.self_attn.q_proj.weight"].const_value.numpy()
        if ours.shape != theirs.shape:
            lookup = {theirs[:, h * head_dim:(h + 1) * head_dim].tobytes(): h for h in range(theirs.shape[1] // head_dim)}
            heads[old] = [lookup[ours[:, h * head_dim:(h + 1) * head_dim].tobytes()] for h in range(ours.shape[1] // head_dim)]
    layers = json.loads((pathlib.Path(args.teacher) / "graphopt.json").read_text())["layers"]
    drop = [index for index in range(layers) if index not in kept]
    pathlib.Path(args.out).write_text(json.dumps({"heads": heads, "channels": channels, "drop": drop}))
    log(f"plan: {len(channels)} layers with channels cut, {len(heads)} with heads cut, {len(drop)} dropped")


def _evaluate(model_dir, label: str, figures: dict, chat: bool = True) -> None:
    from graphopt.evaluate import evaluate
    from graphopt.runtime import Generator

    started = time.perf_counter()
    perplexity = evaluate(model_dir, max_windows=WINDOWS).perplexity
    row = {"perplexity": round(perplexity, 3)}
    if chat:
        answer = Generator(model_dir, ep="cpu").generate_text(QUESTION, chat=True, max_new_tokens=32).text
        row["answer"] = answer.strip().replace("\n", " ")[:120]
        row["paris"] = "Paris" in answer
    figures[label] = row
    log(f"{label}: {row} ({time.perf_counter() - started:.0f} s)")


def _write(out: pathlib.Path, name: str, figures: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\n| model | perplexity | x fp32 | chat answer contains Paris |")
    print("|---|---:|---:|---|")
    base = figures.get("fp32", {}).get("perplexity")
    for label, row in figures.items():
        if isinstance(row, dict) and "perplexity" in row:
            ratio = f"{row['perplexity'] / base:.3f}" if base else "-"
            print(f"| {label} | {row['perplexity']} | {ratio} | {row.get('paris', '-')} |")


def prepare(args) -> None:
    import torch

    from graphopt.distill import sample_data
    from graphopt.export import export
    from graphopt.modeldir import ModelDir
    from graphopt.pruning import Plan, apply_plan
    from graphopt.quantization import QuantizeConfig, quantize

    work, out = pathlib.Path(args.work), pathlib.Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    figures: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    started = time.perf_counter()
    if not (work / "fp32" / "model.onnx").is_file():
        export(args.src, work / "fp32", force=True, run_validation=False)
    figures["export_seconds"] = round(time.perf_counter() - started, 1)
    layout = json.loads(pathlib.Path(args.plan).read_text())
    cut = Plan(heads={int(k): v for k, v in layout["heads"].items()},
               channels={int(k): v for k, v in layout["channels"].items()}, drop=layout["drop"])
    source = ModelDir(work / "fp32")
    apply_plan(source, cut, work / "p25", force=True)
    started = time.perf_counter()
    pool = sample_data(work / "fp32", args.data_tokens, args.seq_len, seed=0, device="cuda", chunk=args.chunk)
    np.save(work / "pool.npy", pool)
    figures["sampling"] = {"tokens": int(pool.size), "rows": int(len(pool)),
                           "seconds": round(time.perf_counter() - started, 1)}
    log(f"sampled {pool.size:,} tokens in {figures['sampling']['seconds']} s")
    _evaluate(work / "fp32", "fp32", figures)
    _evaluate(work / "p25", "p25 (pruned, not distilled)", figures)
    for method in ("rtn", "gptq"):
        started = time.perf_counter()
        quantize(work / "fp32", work / f"int4-{method}", QuantizeConfig(weights="int4", activations="none",
                                                                      block_size=32, method=method, head="int4"),
                 force=True)
        _evaluate(work / f"int4-{method}", f"int4 {method} (PTQ, all linears)", figures, chat=False)
        figures[f"int4 {method} (PTQ, all linears)"]["seconds"] = round(time.perf_counter() - started, 1)
    _write(out, "prepare", figures)


def _distill(args, student: pathlib.Path, output: pathlib.Path, quantize: str | None) -> dict:
    from graphopt.distill import DistillConfig, distill, plot_loss

    work = pathlib.Path(args.work)
    config = DistillConfig(max_minutes=args.minutes, device="cuda", lr=args.lr, batch_size=args.batch_size,
                           micro_batch=args.micro_batch, seq_len=args.seq_len, data=str(work / "pool.npy"),
                           quantize=quantize, block_size=32, warmup_steps=args.warmup_steps,
                           checkpoint_minutes=100, eval_windows=WINDOWS)
    result = distill(student, work / "fp32", output, config, force=True)
    figures = dict(result.figures)
    plot_loss(figures["loss_curve"], pathlib.Path(args.out) / f"{output.name}-loss.png", title=output.name)
    return figures


def heal(args) -> None:
    work, out = pathlib.Path(args.work), pathlib.Path(args.out)
    figures = {"distill": _distill(args, work / "p25", work / "p25-distilled", None)}
    _evaluate(work / "p25-distilled", "p25 distilled", figures)
    figures["fp32"] = {"perplexity": args.fp32_perplexity}
    _write(out, "heal", figures)


def qat(args) -> None:
    from graphopt.quantization import QuantizeConfig, quantize

    work, out = pathlib.Path(args.work), pathlib.Path(args.out)
    figures = {"distill": _distill(args, work / "fp32", work / "qat", "int4")}
    quantize(work / "qat", work / "qat-int4", QuantizeConfig(weights="int4", activations="none", block_size=32,
                                                             head="int4"), force=True)
    _evaluate(work / "qat-int4", "int4 after QAT (all linears)", figures)
    figures["fp32"] = {"perplexity": args.fp32_perplexity}
    _write(out, "qat", figures)


def smoke(args) -> None:
    """The CUDA paths on a tiny model (export, prune, sampling, distill, QAT), before the long runs."""
    from graphopt.distill import DistillConfig, distill, sample_data
    from graphopt.export import export
    from graphopt.pruning import prune
    from graphopt.testing import tiny_checkpoint

    work = pathlib.Path(args.work)
    checkpoint = tiny_checkpoint("llama", work / "tiny-ckpt", num_hidden_layers=4, intermediate_size=128)
    teacher = export(str(checkpoint), work / "tiny", force=True).path
    student = prune(teacher, work / "tiny-p", heads=0.25, channels=0.3, layers=1, importance="random", force=True).path
    pool = sample_data(teacher, 64 * 32, 32, device=args.device, chunk=32)
    np.save(work / "tiny-pool.npy", pool)
    for quantize in (None, "int4"):
        config = DistillConfig(tokens=16 * 32 * 10, batch_size=16, micro_batch=8, seq_len=32, lr=3e-3,
                               data=str(work / "tiny-pool.npy"), device=args.device, eval_windows=0,
                               quantize=quantize, warmup_steps=2)
        result = distill(student, teacher, work / f"tiny-out-{quantize}", config, force=True)
        curve = result.figures["loss_curve"]
        log(f"smoke {quantize}: loss {curve[0][2]} -> {curve[-1][2]}, {result.figures['tokens_per_second']} tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = parser.add_subparsers(dest="stage", required=True)
    one = stages.add_parser("plan")
    one.add_argument("--teacher", required=True)
    one.add_argument("--student", required=True)
    one.add_argument("--out", required=True)
    two = stages.add_parser("smoke")
    two.add_argument("--work", required=True)
    two.add_argument("--device", default="cuda")
    for name in ("prepare", "heal", "qat"):
        stage = stages.add_parser(name)
        stage.add_argument("--work", required=True)
        stage.add_argument("--out", required=True)
        stage.add_argument("--seq-len", type=int, default=512)
        if name == "prepare":
            stage.add_argument("--src", required=True)
            stage.add_argument("--plan", required=True)
            stage.add_argument("--data-tokens", type=int, default=6_000_000)
            stage.add_argument("--chunk", type=int, default=2048)
        else:
            stage.add_argument("--minutes", type=float, default=8.0)
            stage.add_argument("--lr", type=float, default=5e-4 if name == "heal" else 1e-4)
            stage.add_argument("--batch-size", type=int, default=64)
            stage.add_argument("--micro-batch", type=int, default=16)
            stage.add_argument("--warmup-steps", type=int, default=30)
            stage.add_argument("--fp32-perplexity", type=float, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    distill_log = logging.getLogger("graphopt.distill")
    distill_log.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    distill_log.addHandler(handler)
    distill_log.propagate = False
    {"plan": plan, "smoke": smoke, "prepare": prepare, "heal": heal, "qat": qat}[args.stage](args)


if __name__ == "__main__":
    main()
