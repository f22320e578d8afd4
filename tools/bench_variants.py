"""Decode speed of model variants against the first one, in interleaved rounds (A/B for CPU changes).

    python tools/bench_variants.py [LABEL=]MODEL_DIR [LABEL=]MODEL_DIR ... [--tokens 128] [--rounds 5]
        [--threads 2] [--no-spinning] [--json OUT.json] [--png OUT.png]

Every variant decodes the same chat prompt greedily for ``--tokens`` tokens on the static KV
cache (``graphopt.runtime.open_decoder``, as ``graphopt generate`` does), each time in a fresh
process (as an app starts it; sessions created later in one process decoded up to 17% faster here);
the rounds visit the variants in turn, each round starting one later (A, B, C, B, C, A, C, A, B,
...), so that load from other processes falls on all of them alike,
and the table gives the median tokens/s, its ratio to the first variant's (the median of the
per-round ratios, which cancels slow drifts of the machine), the greedy tokens kept identical to
the first variant's, and the largest logit difference from it on the prompt's last position.

"cpu ms" is the CPU time of the calling thread per token. With ``--threads 1`` ONNX Runtime runs
every kernel on that thread, so it is the work a token costs, nearly blind to other processes
taking turns on the cores: the measure to compare kernels by on a busy machine. With more threads
it counts only the caller's share (and its spinning). "p10 ms" is the 10th percentile of the
single-step latencies over all rounds: the steps that other processes left alone, the steadiest
figure when the machine is loaded ("x p10": the first variant's p10 over this one's).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "What is the capital of France? Answer in one sentence, then name two famous museums there."


def decode(decoder, prompt: list[int], tokens: int) -> tuple[float, float, list[float], list[int], np.ndarray]:
    """Prefill (untimed), ``tokens`` greedy steps; tokens/s, CPU ms of this thread per token, each step's ms,
    the ids, the prompt's last logits."""
    decoder.reset()
    decoder.reserve(len(prompt) + tokens + 1)
    logits = decoder.forward(prompt)[-1]
    first = logits.copy()
    generated = []
    steps = []
    started, cpu_started = time.perf_counter(), time.thread_time()
    for _ in range(tokens):
        generated.append(int(np.argmax(logits)))
        step_started = time.perf_counter()
        logits = decoder.forward(generated[-1:])[-1]
        steps.append((time.perf_counter() - step_started) * 1e3)
    cpu_ms = (time.thread_time() - cpu_started) * 1e3 / tokens
    return tokens / (time.perf_counter() - started), cpu_ms, steps, generated, first


def common_prefix(a: list[int], b: list[int]) -> int:
    count = 0
    for left, right in zip(a, b):
        if left != right:
            break
        count += 1
    return count


def measure(model_dir: str, threads: int | None, spinning: bool, tokens: int) -> dict:
    """In a fresh process (``--worker``): one warm-up, then one timed decode of the chat prompt."""
    from graphopt.modeldir import ModelDir
    from graphopt.runtime.device import open_decoder
    from graphopt.runtime.tokenizer import Tokenizer

    model = ModelDir.open(model_dir)
    tokenizer = Tokenizer(model.path)
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}]))
    decoder = open_decoder(model.model_path, ep="cpu", threads=threads, spinning=spinning)
    decode(decoder, prompt, 4)  # first runs allocate
    speed, thread_ms, steps, generated, first = decode(decoder, prompt, tokens)
    return {"speed": speed, "cpu_ms": thread_ms, "steps": steps, "generated": generated, "first": first.tolist(),
            "prompt_tokens": len(prompt)}


def run_measure(model_dir: pathlib.Path, args) -> dict:
    spec = json.dumps({"model_dir": str(model_dir), "threads": args.threads, "spinning": not args.no_spinning,
                       "tokens": args.tokens})
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True, env=environment)
    if done.returncode:
        raise SystemExit(f"worker on {model_dir} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", help="[LABEL=]MODEL_DIR; the first is the reference")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-spinning", action="store_true")
    parser.add_argument("--json", type=pathlib.Path, default=None)
    parser.add_argument("--png", type=pathlib.Path, default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(measure(spec["model_dir"], spec["threads"], spec["spinning"], spec["tokens"])))
        return
    if not args.variants:
        parser.error("give at least one MODEL_DIR")

    import onnxruntime

    from graphopt.modeldir import ModelDir

    variants = []
    for spec in args.variants:
        label, _, path = spec.rpartition("=")
        model = ModelDir.open(path)
        variants.append((label or model.path.name, model))
    speeds: list[list[float]] = [[] for _ in variants]
    cpu_ms: list[list[float]] = [[] for _ in variants]
    steps: list[list[float]] = [[] for _ in variants]
    outputs: list[tuple[list[int], np.ndarray]] = [None] * len(variants)
    load_start = os.getloadavg()
    for round_index in range(args.rounds):
        # Each round starts one variant later (A B C, B C A, C A B, ...), and every variant runs in a
        # process of its own: in one process, sessions created later decoded faster on this VM (the
        # same model loaded four times: 1.00x, 1.06x, 1.12x, 1.17x), which favoured later variants.
        start = round_index % len(variants)
        for index in [*range(start, len(variants)), *range(start)]:
            run = run_measure(variants[index][1].path, args)
            steps[index].extend(run["steps"])
            speeds[index].append(run["speed"])
            cpu_ms[index].append(run["cpu_ms"])
            if outputs[index] is None:
                outputs[index] = (run["generated"], np.asarray(run["first"]))
            prompt_tokens = run["prompt_tokens"]
        print(f"round {round_index + 1}/{args.rounds}: "
              + ", ".join(f"{label} {speeds[index][-1]:.1f}" for index, (label, _) in enumerate(variants)), flush=True)
    load_end = os.getloadavg()
    rows = []
    for index, (label, model) in enumerate(variants):
        ratios = [speed / reference for speed, reference in zip(speeds[index], speeds[0])]
        rows.append({"label": label, "model": str(model.path), "tokens_per_s": statistics.median(speeds[index]),
                     "rounds": speeds[index], "ratio": statistics.median(ratios),
                     "caller_cpu_ms_per_token": statistics.median(cpu_ms[index]),
                     "step_ms_p10": float(np.percentile(steps[index], 10)),
                     "same_tokens": common_prefix(outputs[index][0], outputs[0][0]),
                     "max_logit_diff": float(np.abs(outputs[index][1] - outputs[0][1]).max()),
                     "size_mb": model.size_bytes() / 1e6})
    print(f"\n{platform.machine()} {os.cpu_count()} cores, onnxruntime {onnxruntime.__version__}, threads "
          f"{args.threads or 'default'}, spinning {not args.no_spinning}; load average {load_start[0]:.2f} at the "
          f"start, {load_end[0]:.2f} at the end; {args.tokens} greedy tokens, {prompt_tokens}-token chat prompt, "
          f"{args.rounds} interleaved rounds, a fresh process per variant and round")
    print(f"{'variant':<28}{'tok/s':>8}{'x first':>9}{'cpu ms':>8}{'p10 ms':>8}{'x p10':>7}{'same tokens':>13}{'max |dlogit|':>14}{'MB':>8}")
    for row in rows:
        print(f"{row['label']:<28}{row['tokens_per_s']:>8.1f}{row['ratio']:>9.3f}{row['caller_cpu_ms_per_token']:>8.2f}"
              f"{row['step_ms_p10']:>8.2f}{rows[0]['step_ms_p10'] / row['step_ms_p10']:>7.3f}"
              f"{row['same_tokens']:>8}/{args.tokens:<4}{row['max_logit_diff']:>14.4f}{row['size_mb']:>8.1f}")
    if args.json:
        args.json.write_text(json.dumps({"load_average": [load_start, load_end], "tokens": args.tokens,
                                         "rounds": args.rounds, "rows": rows}, indent=1) + "\n")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 0.6 + 0.45 * len(rows)))
        axis.barh([row["label"] for row in rows][::-1], [row["tokens_per_s"] for row in rows][::-1], color="tab:blue")
        for position, row in enumerate(rows[::-1]):
            axis.text(row["tokens_per_s"], position, f" {row['ratio']:.2f}x", va="center", fontsize=8)
        axis.set_xlabel("decode tokens/s (median of interleaved rounds)")
        figure.tight_layout()
        figure.savefig(args.png, dpi=120)


if __name__ == "__main__":
    main()
