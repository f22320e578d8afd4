"""Benchmark int4 / int8 weight-only methods on SmolLM2: perplexity and token agreement (all windows), greedy
answers kept, size, decode; onnxruntime-genai's builder model in the same run.

    python tools/bench_int4.py --reference FP32_DIR --variant "int4 affine=DIR" --variant ... \
        [--genai "genai builder int4=BUILT"] [--gguf "llama.cpp Q4_0 (gguf)=FILE"] [--threads 2] \
        [--rounds 3] [--out tools/results/bench_int4.json] [--png docs/bench_int4.png]

Each variant is a model directory built beforehand (``graphopt quantize ...`` or ``graphopt export
X.gguf --keep-quantization``); ``--genai`` rows are onnxruntime-genai builder directories (``python -m
onnxruntime_genai.models.builder -i CKPT -o BUILT -p int4 -e cpu``), run by onnxruntime-genai.

* perplexity: graphopt/data/eval-gpl3.txt, windows of 512, every window (``graphopt.evaluate`` for
  graphopt's directories, genai's logits for genai's, on the same token ids);
* token agreement: the fraction of those scored positions whose argmax next token equals the fp32
  reference's (teacher-forced);
* answers kept: 32 chat prompts, 64 greedy tokens each (no stop at EOS); for each prompt the index of
  the first token that differs from the reference's (64 when all agree); the mean over all 32 and
  over the first 8 (the set earlier tables used) are reported;
* size: the model directory on disk (tokenizer included); ``--gguf`` files add their size as rows
  (a GGUF is one file, tokenizer inside) to compare folders with llama.cpp's formats;
* decode: 128 greedy tokens after a short prompt, tokens/s, median of ``--rounds`` interleaved
  rounds, each model in a fresh process per round (``tools/bench_llamacpp.py``'s worker: in one
  process, sessions made later decode faster), ``--threads`` intra-op threads for both runtimes.

Prints a table, writes the JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from graphopt import optimize  # noqa: E402
from graphopt.optimize import ANSWER_PROMPTS  # noqa: E402

# The first 8 are graphopt optimize's validate prompts and the int4-quality issue's measure (at least
# 8 prompts); the other 24 make the mean steadier (one prompt's near-tie flip moves a mean over 8 by
# up to 8 tokens).
CHAT_PROMPTS = [
    *ANSWER_PROMPTS,
    "What are the main causes of climate change?", "Write a haiku about autumn leaves.",
    "How does a refrigerator keep food cold?", "List three benefits of regular exercise.",
    "What is photosynthesis?", "Explain the rules of chess in a few sentences.",
    "Describe a healthy breakfast.", "What is the Pythagorean theorem?",
    "Why do cats purr?", "Give me a recipe for pancakes.",
    "What is the largest planet in our solar system?", "How can I improve my sleep?",
    "Write a short story about a lost dog.", "What does a computer's CPU do?",
    "Explain the water cycle.", "What are some good ways to save money?",
    "Who wrote Pride and Prejudice?", "How do vaccines work?",
    "Translate 'good morning' into Spanish and explain its use.", "What is the speed of light?",
    "Suggest a name for a new coffee shop.", "How do airplanes stay in the air?",
    "What should I pack for a weekend hiking trip?", "Explain what gravity is to a child.",
]
FIRST = 8
SPEED_PROMPT = "The history of the printing press begins"


def directory_size(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def greedy_answers(model_dir: pathlib.Path, tokens: int) -> list[list[int]]:
    return optimize.greedy_answers(model_dir, CHAT_PROMPTS, tokens)


def decode_speeds(rows: dict[str, tuple[str, pathlib.Path]], prompt: list[int], rounds: int, threads: int,
                  tokens: int = 128) -> dict[str, list[float]]:
    """Median tokens/s of each round, every model in a fresh process per round, the order rotated each round."""
    from bench_llamacpp import run_worker

    speeds: dict[str, list[float]] = {name: [] for name in rows}
    names = list(rows)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            runtime, path = rows[name]
            result = run_worker(runtime, path, threads, [prompt], tokens, prompt)
            speeds[name].append(result["decode_tokens_per_s"][0])
        print(f"round {round_index + 1}/{rounds}: " + ", ".join(f"{name} {speeds[name][-1]:.1f}" for name in names),
              flush=True)
    return speeds


def genai_quality(built: pathlib.Path, windows: list[list[int]], reference_argmax: list[np.ndarray],
                  threads: int) -> tuple[float, float]:
    """Perplexity and token agreement of an onnxruntime-genai model on ``windows`` (genai's logits)."""
    from bench_genai_builder import genai_logprobs
    from bench_llamacpp import GenaiRunner

    total, agreeing, count = 0.0, 0, 0
    for ids, expected, logprobs in zip(windows, reference_argmax,
                                       genai_logprobs(GenaiRunner(str(built), threads).model, windows)):
        total -= float(logprobs[np.arange(len(ids) - 1), ids[1:]].sum())
        agreeing += int((logprobs.argmax(-1) == expected).sum())
        count += len(ids) - 1
    return float(np.exp(total / count)), agreeing / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", required=True, type=pathlib.Path, help="the fp32 model directory")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--genai", action="append", default=[], metavar="NAME=DIR",
                        help="an onnxruntime-genai builder directory, run by onnxruntime-genai")
    parser.add_argument("--gguf", action="append", default=[], metavar="NAME=FILE", help="size-only rows")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-windows", type=int, default=None, help="default: every window")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("tools/results/bench_int4.json"))
    parser.add_argument("--png", type=pathlib.Path, default=pathlib.Path("docs/bench_int4.png"))
    args = parser.parse_args()

    from bench_llamacpp import answers as runner_answers

    from graphopt.evaluate import DEFAULT_TEXT, evaluate, read_text, sequence_logprobs, text_windows
    from graphopt.modeldir import ModelDir
    from graphopt.runtime import Decoder, Generator

    rows: dict[str, tuple[str, pathlib.Path]] = {"fp32": ("graphopt", args.reference)}
    for runtime, entries in (("graphopt", args.variant), ("genai", args.genai)):
        for entry in entries:
            name, _, path = entry.partition("=")
            rows[name] = (runtime, pathlib.Path(path))
    started = time.time()
    reference = Generator(args.reference)
    chat_prompts = [reference.encode_prompt(prompt, chat=True) for prompt in CHAT_PROMPTS]
    speed_prompt = reference.encode_prompt(SPEED_PROMPT)
    windows = text_windows(reference.tokenizer.encode(read_text(DEFAULT_TEXT)), 512, args.max_windows)
    del reference
    reference_answers = greedy_answers(args.reference, args.tokens)
    reference_argmax = None
    results = []
    for name, (runtime, directory) in rows.items():
        load = os.getloadavg()[0]
        if runtime == "graphopt":
            evaluation = evaluate(directory, DEFAULT_TEXT, window=512, max_windows=args.max_windows,
                                  reference_dir=None if name == "fp32" else args.reference)
            perplexity, agreement = evaluation.perplexity, evaluation.token_agreement or 1.0
            answers = reference_answers if name == "fp32" else greedy_answers(directory, args.tokens)
        else:
            if reference_argmax is None:
                decoder = Decoder(ModelDir.open(args.reference).model_path)
                reference_argmax = [sequence_logprobs(decoder, ids)[0].argmax(-1) for ids in windows]
                del decoder
            perplexity, agreement = genai_quality(directory, windows, reference_argmax, args.threads)
            answers = runner_answers("genai", directory, args.threads, chat_prompts, args.tokens)
        divergences = [optimize.kept_tokens(answer, expected) for answer, expected in zip(answers, reference_answers)]
        results.append({"variant": name, "runtime": runtime, "directory": str(directory), "perplexity": perplexity,
                        "token_agreement": agreement, "windows": len(windows), "tokens": sum(len(w) - 1 for w in windows),
                        "first_divergence": divergences, "mean_first_divergence": sum(divergences) / len(divergences),
                        "mean_first_divergence_first8": sum(divergences[:FIRST]) / FIRST,
                        "size_bytes": directory_size(directory), "load_average_eval": load})
        print(f"  {name}: perplexity {perplexity:.3f}, agreement {agreement:.3f}, answers kept "
              f"{results[-1]['mean_first_divergence']:.1f} tokens (load {load:.1f})", flush=True)
    load_before = os.getloadavg()
    speeds = decode_speeds(rows, speed_prompt, args.rounds, args.threads)
    load = os.getloadavg()
    for result in results:
        result["decode_tokens_per_s"] = statistics.median(speeds[result["variant"]])
        result["decode_rounds"] = speeds[result["variant"]]
        result["load_average_decode"] = [load_before[0], load[0]]
    for entry in args.gguf:
        name, _, path = entry.partition("=")
        results.append({"variant": name, "directory": path, "size_bytes": pathlib.Path(path).stat().st_size})
    base = results[0]
    print(f"\nSmolLM2, {DEFAULT_TEXT.name}, windows of 512 ({base['windows']} windows, {base['tokens']} tokens); answers: "
          f"{len(CHAT_PROMPTS)} chat prompts x {args.tokens} greedy tokens; decode: median of {args.rounds} rounds, "
          f"{args.threads} threads (load {load_before[0]:.1f} -> {load[0]:.1f})\n")
    print(f"| variant | perplexity | Δ | token agreement | answers kept ({len(CHAT_PROMPTS)} prompts, of {args.tokens}) | "
          f"first {FIRST} prompts | size MB | × fp32 size | decode tok/s | × fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for result in results:
        if "perplexity" not in result:
            print(f"| {result['variant']} | – | – | – | – | – | {result['size_bytes'] / 1e6:.1f} | "
                  f"{result['size_bytes'] / base['size_bytes']:.2f} | – | – |")
            continue
        delta = 100 * (result["perplexity"] / base["perplexity"] - 1)
        print(f"| {result['variant']} | {result['perplexity']:.3f} | {delta:+.1f}% | {result['token_agreement']:.3f} | "
              f"{result['mean_first_divergence']:.1f} | {result['mean_first_divergence_first8']:.1f} | "
              f"{result['size_bytes'] / 1e6:.1f} | "
              f"{result['size_bytes'] / base['size_bytes']:.2f} | {result['decode_tokens_per_s']:.1f} | "
              f"{result['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "seconds": round(time.time() - started),
                                    "load_average_end": load}, indent=2))
    plot(results, args.png)
    print(f"\nwrote {args.out} and {args.png}")
    return 0


def plot(results: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [result for result in results if "perplexity" in result]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for result in measured:
        left.scatter(result["size_bytes"] / 1e6, result["perplexity"])
        left.annotate(result["variant"], (result["size_bytes"] / 1e6, result["perplexity"]), fontsize=7)
        right.scatter(result["decode_tokens_per_s"], result["mean_first_divergence"])
        right.annotate(result["variant"], (result["decode_tokens_per_s"], result["mean_first_divergence"]), fontsize=7)
    for result in results:
        if "perplexity" not in result:
            left.axvline(result["size_bytes"] / 1e6, linestyle=":", color="grey")
            left.annotate(result["variant"], (result["size_bytes"] / 1e6, left.get_ylim()[1]), fontsize=7, rotation=90,
                          va="top")
    left.set_xlabel("size on disk, MB")
    left.set_ylabel("perplexity (eval-gpl3, all windows of 512)")
    right.set_xlabel("decode tokens/s (128 greedy tokens)")
    right.set_ylabel("mean first divergence from fp32 (of 64 tokens)")
    figure.suptitle("SmolLM2-135M-Instruct: quantization methods")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
