"""onnxruntime-genai on graphopt's model vs on onnxruntime-genai's own builder's model of the same checkpoint.

    python -m onnxruntime_genai.models.builder -i HF_CHECKPOINT -o BUILT -p int4 -e cpu -c CACHE
    python tools/bench_genai_builder.py GRAPHOPT_DIR BUILT [--windows 4] [--window 512] [--rounds 3]
        [--json tools/results/genai_builder.json]

Both models run in onnxruntime-genai, each with the genai_config.json its tool wrote; a third row
runs the builder's graph with graphopt's session options, so the graphs are also compared alone. Perplexity: the
logits of windows of ``window + 1`` tokens of graphopt's evaluation text (the same text and windows
as `graphopt eval`), each scored from an empty cache through genai's ``get_output("logits")``.
Speed: greedy chat answers (up to 64 new tokens), the two models interleaved in each round, medians
(``tools/bench_interop.py``'s genai loop). The load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_interop import PROMPTS, run_genai  # noqa: E402


def genai_logprobs(model, windows: list[list[int]]):
    """Per window of ids, genai's log-probabilities of each next token (``[len - 1, vocab]``), one
    generator per window from an empty cache."""
    import onnxruntime_genai as og

    from graphopt.evaluate import log_softmax

    for ids in windows:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 1)
        generator = og.Generator(model, params)
        generator.append_tokens(ids[:-1])
        yield log_softmax(np.asarray(generator.get_output("logits"))[0])
        del generator


def genai_perplexity(model, windows: list[list[int]]) -> float:
    total, count = 0.0, 0
    for ids, logprobs in zip(windows, genai_logprobs(model, windows)):
        total -= float(logprobs[np.arange(len(ids) - 1), ids[1:]].sum())
        count += len(ids) - 1
    return float(np.exp(total / count))


def size_mb(directory: pathlib.Path) -> float:
    return sum(file.stat().st_size for file in directory.iterdir() if file.is_file()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graphopt_dir", type=pathlib.Path)
    parser.add_argument("built_dir", type=pathlib.Path)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args()

    import onnxruntime_genai as og

    from graphopt.evaluate import DEFAULT_TEXT, read_text, text_windows
    from graphopt.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer(args.graphopt_dir)
    windows = text_windows(tokenizer.encode(read_text(DEFAULT_TEXT)), args.window, args.windows)
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))
               for prompt in PROMPTS]
    labels = {"graphopt int4": args.graphopt_dir, "genai builder int4": args.built_dir,
              "genai builder int4, intra_op_num_threads 0": args.built_dir}
    models = {label: og.Model(str(path)) for label, path in list(labels.items())[:2]}
    # The builder's genai_config.json leaves genai's default of one intra-op thread; graphopt's asks
    # for one per core. The third row runs the builder's graph with graphopt's session options, so
    # the graphs are compared apart from the configs.
    config = og.Config(str(args.built_dir))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": 0}}}}))
    models["genai builder int4, intra_op_num_threads 0"] = og.Model(config)
    load = [os.getloadavg()[0]]
    results = {label: {"size_mb": round(size_mb(path), 1), "perplexity": genai_perplexity(models[label], windows)}
               for label, path in labels.items()}
    load.append(os.getloadavg()[0])
    samples = {label: [] for label in labels}
    for model in models.values():
        run_genai(model, prompts[:1], 4)  # warm up
    for _ in range(args.rounds):
        for label, model in models.items():
            samples[label] += run_genai(model, prompts, args.max_new_tokens)
        load.append(os.getloadavg()[0])
    for label, rows in samples.items():
        results[label].update(prefill_ms=statistics.median(row[0] for row in rows),
                              decode_tokens_per_s=statistics.median(row[1] for row in rows))
    print(f"load average (1 min) during the run: {min(load):.1f}-{max(load):.1f}")
    print(f"| model (run by onnxruntime-genai) | size MB | perplexity ({len(windows)} x {args.window}) | prefill ms | decode tok/s |")
    print("|---|---:|---:|---:|---:|")
    for label, row in results.items():
        print(f"| {label} | {row['size_mb']:.1f} | {row['perplexity']:.3f} | {row['prefill_ms']:.1f} | "
              f"{row['decode_tokens_per_s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"load_average": [min(load), max(load)], "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
