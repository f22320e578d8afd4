"""Benchmark structured pruning on SmolLM2-135M (CPU, batch 1): size, decode speed, perplexity, a chat answer.

For each target fraction of parameters removed, prunes with measured importance and with random
importance (the control, same split, same sizes), and at one size compares the three ``--params``
splits. Importance is measured once on the unpruned model (data-free calibration: sequences the
model samples itself, so the perplexity text is never seen) and reused for every plan.

    python tools/bench_prune.py --source SMOLLM2_DIR [--sizes 0.1 0.25 0.4] [--windows 4]

Prints a markdown table, writes ``bench_prune.png`` and ``bench_prune.json`` under ``--out``.
Decode tokens/s: ``graphopt.runtime.Generator``, 128 greedy tokens after a short prompt, best of
``--repeats`` runs; and, because the machine is shared (the load average is printed with the table),
also from the 10th-percentile latency of 128 single decode steps, which bursts of other work
disturb less. ``--reuse`` measures the pruned directories of an earlier run again without pruning.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import numpy as np

from graphopt import ir as graph_ir
from graphopt.calibration import CalibrationSpec, calibration_sequences
from graphopt.evaluate import DEFAULT_TEXT, evaluate
from graphopt.importance import Importance, measured_importance, random_importance
from graphopt.modeldir import ModelDir
from graphopt.pruning import SPLITS, apply_plan, measure_shapes, plan_for_parameters
from graphopt.runtime import Decoder, Generator

QUESTION = "What is the capital of France?"
SPEED_PROMPT = "The history of the city begins"


def decode_speed(model_dir: pathlib.Path, tokens: int, repeats: int) -> float:
    generator = Generator(model_dir)
    prompt = generator.encode_prompt(SPEED_PROMPT)
    # Decode only (the first new token comes from the prefill), best of ``repeats`` on a shared machine.
    return max(generator.generate(prompt, max_new_tokens=tokens, stop_on_eos=False).decode_tokens_per_s
               for _ in range(repeats))


def step_speed(model_dir: pathlib.Path, tokens: int) -> float:
    """Tokens/s from the 10th-percentile decode-step latency: what one step costs when the shared
    machine lets it run, robust to other processes' bursts (greedy steps on a growing cache)."""
    decoder = Decoder(ModelDir.open(model_dir).model_path)
    logits = decoder.forward(Generator(model_dir).encode_prompt(SPEED_PROMPT))
    latencies = []
    for _ in range(tokens):
        started = time.perf_counter()
        logits = decoder.forward([int(np.argmax(logits[-1]))])
        latencies.append(time.perf_counter() - started)
    return 1.0 / float(np.percentile(latencies, 10))


def chat_answer(model_dir: pathlib.Path) -> str:
    generator = Generator(model_dir)
    result = generator.generate(generator.encode_prompt(QUESTION, chat=True), max_new_tokens=24)
    return result.text


def measure(model_dir: pathlib.Path, args) -> dict:
    directory = ModelDir.open(model_dir)
    model = graph_ir.load(directory.model_path)
    quality = evaluate(model_dir, DEFAULT_TEXT, window=512, max_windows=args.windows)
    answer = chat_answer(model_dir)
    return {"parameters": graph_ir.parameter_count(model), "size_mb": directory.size_bytes() / 1e6,
            "tokens_per_s": decode_speed(model_dir, args.tokens, args.repeats), "perplexity": quality.perplexity,
            "scored_tokens": quality.tokens, "answer": answer.strip().replace("\n", " ")[:60],
            "paris": "paris" in answer.lower()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="exported float32 model directory")
    parser.add_argument("--out", default="bench-out/prune")
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.1, 0.25, 0.4])
    parser.add_argument("--split", default="channels", choices=SPLITS, help="Split used for the size sweep.")
    parser.add_argument("--compare-splits-at", type=float, default=0.25)
    parser.add_argument("--windows", type=int, default=4, help="Perplexity windows of 512 tokens.")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="Measure pruned directories left by an earlier run.")
    parser.add_argument("--rounds", type=int, default=2, help="Interleaved rounds of the step-latency measure.")
    parser.add_argument("--speed-only", action="store_true",
                        help="Re-measure only the step speeds of the models in an earlier bench_prune.json.")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    if args.speed_only:
        rows = json.loads((out / "bench_prune.json").read_text())["rows"]
        for row in rows:
            row.setdefault("path", args.source if row["model"] == "baseline" else str(out / row["model"]))
    else:
        rows = prune_and_measure(args, out)
    interleaved_step_speeds(rows, args)
    report(rows, args, out)


def prune_and_measure(args, out: pathlib.Path) -> list[dict]:
    source = ModelDir.open(args.source)
    out.mkdir(parents=True, exist_ok=True)
    model = graph_ir.load(source.model_path)
    shapes = measure_shapes(model)
    scores = {}
    # Measured scores are kept beside the outputs, so a rerun (another split, --reuse) need not recompute them.
    cached = out / f"importance-{args.calib_samples}x128-seed{args.seed}.npz"

    def importance(kind: str):
        """Measured once, on first need (a --reuse run that prunes nothing measures nothing)."""
        if kind not in scores and kind == "random":
            scores[kind] = random_importance(model, args.seed)
        elif kind not in scores and cached.is_file():
            with np.load(cached) as archive:
                layers = len(shapes.layouts)
                scores[kind] = Importance(heads=[archive[f"heads.{i}"] for i in range(layers)],
                                          channels=[archive[f"channels.{i}"] for i in range(layers)],
                                          layers=archive["layers"])
        elif kind not in scores:
            started = time.perf_counter()
            calib = CalibrationSpec(samples=args.calib_samples, seq_len=128, seed=args.seed)
            sequences = calibration_sequences(source.path, calib)
            scores[kind] = measured_importance(source.model_path, model, sequences)
            print(f"importance measured in {time.perf_counter() - started:.0f} s "
                  f"({args.calib_samples} self-generated sequences of 128 tokens)")
            measured = scores[kind]
            np.savez(cached, layers=measured.layers, **{f"heads.{i}": h for i, h in enumerate(measured.heads)},
                     **{f"channels.{i}": c for i, c in enumerate(measured.channels)})
        return scores[kind]

    runs = [("baseline", 0.0, "-", "-")]
    runs += [(f"{kind}-{args.split}-{size:g}", size, args.split, kind)
             for size in args.sizes for kind in ("measured", "random")]
    runs += [(f"measured-{split}-{args.compare_splits_at:g}", args.compare_splits_at, split, "measured")
             for split in SPLITS if split != args.split]
    rows = []
    for name, size, split, kind in runs:
        if name == "baseline":
            target = source.path
        elif args.reuse and (out / name / "graphopt.json").is_file():
            target = out / name
        else:
            target = out / name
            plan = plan_for_parameters(size, split, importance(kind), shapes)
            apply_plan(source, plan, target, force=True)
        row = {"model": name, "path": str(target), "target": size, "split": split, "importance": kind,
               **measure(target, args)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def interleaved_step_speeds(rows: list[dict], args) -> None:
    """Step tokens/s of every model, measured in ``--rounds`` interleaved rounds, best round kept:
    a burst of other work then hits one round of one model, not all of one model's numbers."""
    for row in rows:
        row["step_tokens_per_s"] = 0.0
    for round_index in range(args.rounds):
        for row in rows:
            speed = step_speed(pathlib.Path(row["path"]), args.tokens)
            row["step_tokens_per_s"] = max(row["step_tokens_per_s"], speed)
        print(f"speed round {round_index + 1}: " + ", ".join(f"{row['model']} {row['step_tokens_per_s']:.1f}"
                                                             for row in rows), flush=True)


def report(rows: list[dict], args, out: pathlib.Path) -> None:
    base = rows[0]
    for row in rows:
        row["removed"] = 1 - row["parameters"] / base["parameters"]
        row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["step_speedup"] = row["step_tokens_per_s"] / base["step_tokens_per_s"]

    load = os.getloadavg()
    print(f"\nSmolLM2-135M fp32, CPU EP, batch 1; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
          f"on {os.cpu_count()} cores; perplexity on {DEFAULT_TEXT.name}, {base['scored_tokens']} tokens "
          f"({args.windows} windows of 512)\n")
    print("| model | removed | params (M) | size (MB) | decode tok/s (best run) | speed-up | tok/s (p10 step) | "
          "speed-up | perplexity | France? |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['removed']:.1%} | {row['parameters'] / 1e6:.1f} | {row['size_mb']:.0f} | "
              f"{row['tokens_per_s']:.1f} | {row['speedup']:.2f}x | {row['step_tokens_per_s']:.1f} | "
              f"{row['step_speedup']:.2f}x | {row['perplexity']:.2f} | {'Paris' if row['paris'] else 'no'} |")
    answering = [row for row in rows if row["paris"]]
    smallest = min(answering, key=lambda row: row["parameters"]) if answering else None
    if smallest:
        print(f"\nsmallest model answering 'Paris': {smallest['model']} ({smallest['removed']:.1%} removed): "
              f"{smallest['answer']!r}")
    (out / "bench_prune.json").write_text(json.dumps({"rows": rows, "load": load}, indent=2))
    plot(rows, out / "bench_prune.png")
    print(f"wrote {out / 'bench_prune.png'}")


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for importance, marker in (("measured", "o"), ("random", "x")):
        chosen = [row for row in rows if row["importance"] in (importance, "-") and row["split"] in (rows[1]["split"], "-")]
        chosen.sort(key=lambda row: row["removed"])
        left.plot([row["removed"] * 100 for row in chosen], [row["perplexity"] for row in chosen], marker=marker,
                  label=f"{importance} importance")
        right.plot([row["removed"] * 100 for row in chosen], [row["step_speedup"] for row in chosen], marker=marker,
                   label=f"{importance} importance")
    for row in rows:
        if row["importance"] == "measured" and row["split"] != rows[1]["split"]:
            left.scatter([row["removed"] * 100], [row["perplexity"]], marker="s", label=f"split: {row['split']}")
    left.set_yscale("log")
    left.set_xlabel("parameters removed (%)")
    left.set_ylabel("perplexity (log)")
    left.legend()
    ideal = [fraction / 100 for fraction in range(0, 50)]
    right.plot([x * 100 for x in ideal], [1 / (1 - x) for x in ideal], linestyle=":", color="grey",
               label="1 / (1 - removed)")
    right.set_xlabel("parameters removed (%)")
    right.set_ylabel("decode speed-up (x, p10 step latency)")
    right.legend()
    figure.suptitle("Structured pruning of SmolLM2-135M (ONNX graph, CPU, batch 1)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
