"""graphopt's runtime vs onnxruntime-genai vs Optimum on the same graphopt model directories.

    python tools/bench_interop.py DIR [DIR ...] [--optimum-python PY] [--rounds R] [--max-new-tokens N]
        [--json tools/results/interop.json] [--png docs/interop.png]

Each runtime decodes the same chat prompts from the same token ids (greedy, stopping at EOS, up to
N new tokens); rounds interleave the runtimes so that load on a shared machine hits them alike, and
the table gives medians. Prefill is the time to the first new token; decode tokens/s counts the
tokens after it. Optimum runs in its own environment (``tools/optimum_env.py``), one process per
directory per round; its time to load the model is not counted. The load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

PROMPTS = ("Write a short story about a robot who learns to paint.",
           "Explain how a refrigerator works, step by step.",
           "What are three good habits for staying healthy?")
TOOLS = pathlib.Path(__file__).resolve().parent


def run_graphopt(generator, prompts, max_new_tokens):
    rows = []
    for ids in prompts:
        result = generator.generate(ids, max_new_tokens=max_new_tokens)
        rows.append((result.prefill_ms, result.decode_tokens_per_s, result.token_ids))
    return rows


def run_genai(model, prompts, max_new_tokens):
    import onnxruntime_genai as og

    rows = []
    for ids in prompts:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
        generator = og.Generator(model, params)
        started = time.perf_counter()
        generator.append_tokens(ids)
        generator.generate_next_token()
        tokens = [int(generator.get_next_tokens()[0])]
        first = time.perf_counter()
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        decode_s = time.perf_counter() - first
        rows.append(((first - started) * 1e3, (len(tokens) - 1) / decode_s if len(tokens) > 1 else 0.0, tokens))
        del generator
    return rows


def run_optimum(python, directory, prompts, max_new_tokens):
    done = subprocess.run([str(python), str(TOOLS / "optimum_generate.py")], capture_output=True, text=True,
                          input=json.dumps({"model_dir": str(directory), "prompts": prompts,
                                            "max_new_tokens": max_new_tokens}))
    if done.returncode:
        return None
    out = json.loads(done.stdout)
    return list(zip(out["prefill_ms"], out["decode_tokens_per_s"], out["tokens"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--optimum-python", default=os.environ.get("GRAPHOPT_OPTIMUM_PYTHON"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--png", type=pathlib.Path)
    args = parser.parse_args()

    import onnxruntime_genai as og

    from graphopt.modeldir import ModelDir
    from graphopt.runtime import Generator

    load = [os.getloadavg()[0]]
    results = {}
    for directory in args.dirs:
        directory = pathlib.Path(directory)
        generator = Generator(directory)
        prompts = [generator.encode_prompt(prompt, chat=True) for prompt in PROMPTS]
        model = og.Model(str(directory))
        runtimes = ModelDir.open(directory).manifest.runtimes or {}
        quiet = Generator(directory, spinning=False)  # ORT's threads sleep between runs instead of spinning
        samples = {"graphopt": [], "graphopt (no spinning)": [], "onnxruntime-genai": [], "optimum": []}
        agree = {name: True for name in samples}
        run_graphopt(generator, prompts[:1], 4), run_genai(model, prompts[:1], 4)  # warm up
        for _ in range(args.rounds):
            ours = run_graphopt(generator, prompts, args.max_new_tokens)
            samples["graphopt"] += ours
            theirs = {"graphopt (no spinning)": run_graphopt(quiet, prompts, args.max_new_tokens),
                      "onnxruntime-genai": run_genai(model, prompts, args.max_new_tokens)}
            if args.optimum_python and runtimes.get("optimum", {}).get("loads"):
                theirs["optimum"] = run_optimum(args.optimum_python, directory, prompts, args.max_new_tokens)
            for name, rows in theirs.items():
                if rows is None:
                    continue
                samples[name] += rows
                agree[name] &= [row[2] for row in rows] == [row[2] for row in ours]
            load.append(os.getloadavg()[0])
        results[directory.name] = {
            name: {"prefill_ms": statistics.median(row[0] for row in rows),
                   "decode_tokens_per_s": statistics.median(row[1] for row in rows),
                   "same_tokens_as_graphopt": agree.get(name, True)} if rows else None
            for name, rows in samples.items()}
        del model, generator, quiet
    print(f"load average (1 min) during the run: {min(load):.1f}-{max(load):.1f}")
    print("| model | runtime | prefill ms | decode tok/s | same greedy tokens as graphopt |")
    print("|---|---|---:|---:|---|")
    for model_name, by_runtime in results.items():
        for name, row in by_runtime.items():
            if row is None:
                print(f"| {model_name} | {name} | - | - | not run |")
            else:
                print(f"| {model_name} | {name} | {row['prefill_ms']:.1f} | {row['decode_tokens_per_s']:.1f} | "
                      f"{'yes' if row['same_tokens_as_graphopt'] else 'NO'} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"load_average": [min(load), max(load)], "rounds": args.rounds,
                                         "max_new_tokens": args.max_new_tokens, "results": results}, indent=2) + "\n")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 3.5))
        names = list(next(iter(results.values())))
        width = 0.8 / len(names)
        for index, name in enumerate(names):
            values = [(by.get(name) or {}).get("decode_tokens_per_s", 0.0) for by in results.values()]
            axis.bar([i + index * width for i in range(len(results))], values, width, label=name)
        axis.set_xticks([i + width for i in range(len(results))], list(results))
        axis.set_ylabel("decode tokens/s (2-core CPU)")
        axis.set_title(f"same graphopt models, three runtimes (load average {min(load):.1f}-{max(load):.1f})")
        axis.legend()
        figure.tight_layout()
        figure.savefig(args.png, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
