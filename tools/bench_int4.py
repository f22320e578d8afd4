"""Benchmark int4 / int8 weight-only methods on SmolLM2: perplexity (all windows), greedy answers kept, size, decode.

    python tools/bench_int4.py --reference FP32_DIR --variant "int4 affine=DIR" --variant ... \
        [--gguf "llama.cpp Q4_0 (gguf)=FILE"] [--out tools/results/bench_int4.json] [--png docs/bench_int4.png]

Each variant is a model directory built beforehand (``graphopt quantize ...`` or ``graphopt export
X.gguf --keep-quantization``); the command lines used are in notes/README-int4.md.

* perplexity: ``graphopt.evaluate`` on graphopt/data/eval-gpl3.txt, windows of 512, every window;
* answers kept: 8 chat prompts, 64 greedy tokens each (no stop at EOS); for each prompt the index of
  the first token that differs from the reference's (64 when all agree); the mean is reported;
* size: the model directory on disk (tokenizer included); ``--gguf`` files add their size as rows
  (a GGUF is one file, tokenizer inside) to compare folders with llama.cpp's formats;
* decode: 128 greedy tokens after a short prompt, tokens/s, best of ``--rounds`` rounds
  interleaved over the variants (the machine is shared; the load average is printed beside).

Prints a table, writes the JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a neural network is in two sentences.",
    "Give me three tips for staying focused while studying.",
    "How do I make a cup of tea?",
    "What is the difference between weather and climate?",
    "Summarize the plot of Romeo and Juliet.",
    "Why is the sky blue?",
]
SPEED_PROMPT = "The history of the printing press begins"


def directory_size(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def greedy_answers(model_dir: pathlib.Path, tokens: int) -> list[list[int]]:
    from graphopt.runtime import Generator

    generator = Generator(model_dir)
    return [generator.generate(generator.encode_prompt(prompt, chat=True), max_new_tokens=tokens,
                               stop_on_eos=False).token_ids for prompt in CHAT_PROMPTS]


def first_divergence(answer: list[int], reference: list[int]) -> int:
    for index, (token, expected) in enumerate(zip(answer, reference)):
        if token != expected:
            return index
    return min(len(answer), len(reference))


def decode_speeds(directories: dict[str, pathlib.Path], rounds: int) -> dict[str, list[float]]:
    from graphopt.runtime import Generator

    speeds: dict[str, list[float]] = {name: [] for name in directories}
    for _ in range(rounds):
        for name, directory in directories.items():
            generator = Generator(directory)
            prompt = generator.encode_prompt(SPEED_PROMPT)
            generator.generate(prompt, max_new_tokens=8, stop_on_eos=False)  # warm-up
            result = generator.generate(prompt, max_new_tokens=128, stop_on_eos=False)
            speeds[name].append(result.decode_tokens_per_s)
            del generator
    return speeds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", required=True, type=pathlib.Path, help="the fp32 model directory")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--gguf", action="append", default=[], metavar="NAME=FILE", help="size-only rows")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-windows", type=int, default=None, help="default: every window")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("tools/results/bench_int4.json"))
    parser.add_argument("--png", type=pathlib.Path, default=pathlib.Path("docs/bench_int4.png"))
    args = parser.parse_args()

    from graphopt.evaluate import DEFAULT_TEXT, evaluate

    directories = {"fp32": args.reference}
    for entry in args.variant:
        name, _, path = entry.partition("=")
        directories[name] = pathlib.Path(path)
    started = time.time()
    reference_answers = greedy_answers(args.reference, args.tokens)
    results = []
    for name, directory in directories.items():
        load = os.getloadavg()[0]
        evaluation = evaluate(directory, DEFAULT_TEXT, window=512, max_windows=args.max_windows)
        answers = reference_answers if name == "fp32" else greedy_answers(directory, args.tokens)
        divergences = [first_divergence(answer, expected) for answer, expected in zip(answers, reference_answers)]
        results.append({"variant": name, "directory": str(directory), "perplexity": evaluation.perplexity,
                        "windows": evaluation.windows, "tokens": evaluation.tokens,
                        "first_divergence": divergences, "mean_first_divergence": sum(divergences) / len(divergences),
                        "size_bytes": directory_size(directory), "load_average_eval": load})
        print(f"  {name}: perplexity {evaluation.perplexity:.3f}, answers kept {results[-1]['mean_first_divergence']:.1f} "
              f"tokens (load {load:.1f})", flush=True)
    speeds = decode_speeds(directories, args.rounds)
    load = os.getloadavg()
    for result in results:
        result["decode_tokens_per_s"] = max(speeds[result["variant"]])
        result["decode_rounds"] = speeds[result["variant"]]
        result["load_average_decode"] = load[0]
    for entry in args.gguf:
        name, _, path = entry.partition("=")
        results.append({"variant": name, "directory": path, "size_bytes": pathlib.Path(path).stat().st_size})
    base = results[0]
    print(f"\nSmolLM2, {DEFAULT_TEXT.name}, windows of 512 ({base['windows']} windows, {base['tokens']} tokens); answers: "
          f"{len(CHAT_PROMPTS)} chat prompts x {args.tokens} greedy tokens; decode best of {args.rounds} (load {load[0]:.1f})\n")
    print("| variant | perplexity | Δ | answers kept (mean first divergence / 64) | size MB | × fp32 size | decode tok/s | × fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for result in results:
        if "perplexity" not in result:
            print(f"| {result['variant']} | – | – | – | {result['size_bytes'] / 1e6:.1f} | "
                  f"{result['size_bytes'] / base['size_bytes']:.2f} | – | – |")
            continue
        delta = 100 * (result["perplexity"] / base["perplexity"] - 1)
        print(f"| {result['variant']} | {result['perplexity']:.3f} | {delta:+.1f}% | {result['mean_first_divergence']:.1f} | "
              f"{result['size_bytes'] / 1e6:.1f} | {result['size_bytes'] / base['size_bytes']:.2f} | "
              f"{result['decode_tokens_per_s']:.1f} | {result['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f} |")
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
