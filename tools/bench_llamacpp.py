"""graphopt against llama.cpp (llama-cpp-python) on the same weights, the same prompts and the same threads.

    python tools/bench_llamacpp.py --gguf SRC.gguf --fused FUSED_DIR --work WORK [--threads 2] [--rounds 3]
        [--tokens 128] [--prefill 512] [--windows N] [--json tools/results/bench_llamacpp.json]
        [--png docs/bench_llamacpp.png] [--variants NAME ...] [--genai-int4 BUILT]

Models (made once under WORK, reused when present):

* llama.cpp: ``SRC.gguf`` requantized by llama.cpp itself (``llama_cpp.llama_model_quantize``, as
  ``llama-quantize --allow-requantize`` does) to F32, Q8_0, Q4_0 and Q4_K_M. SmolLM2's GGUF is
  Q4_1; requantizing dequantizes it to float first, so every llama.cpp model starts from the same
  float weights as graphopt's export of that GGUF.
* graphopt: ``graphopt quantize FUSED --weights int8|int4 --activations none`` with every other
  option at its default (what a user gets), and the fused float model itself.
* onnxruntime-genai (with ``--genai-int4``): its builder's int4 model of the same checkpoint, run by
  genai at the same thread count (perplexity through genai's logits).

Measured, for each model:

* decode tokens/s: each chat prompt (the same token ids for both runtimes, from the model's chat
  template) is prefilled, then ``--tokens`` greedy tokens are decoded (EOS ignored, so every
  model does the same work); a token's argmax is taken with numpy on both sides;
* prefill: the first ``--prefill`` tokens of the evaluation text in one forward, from an empty cache;
* time to first token from process start: the parent starts a fresh Python process per model and
  round and takes the wall time until that process has the first token of the first chat prompt
  (interpreter start, imports, model load, session set-up, prefill, first argmax). The model files
  are in the page cache (warm disk), as on a second launch of an app;
* perplexity on ``graphopt/data/eval-gpl3.txt``: windows of 513 tokens starting every 512, each
  from an empty cache, 512 scored predictions per window, for both runtimes on the same token ids
  (graphopt's token ids are fed to both; the table says whether llama.cpp's own tokenizer agrees);
* greedy tokens identical to the graphopt float model's: mean over the prompts of the first position
  where a model's greedy answer differs from fp32's (``--tokens`` when it never does); and "kept
  32x64", the same over ``tools/bench_int4.py``'s 32 chat prompts and 64 tokens (untimed, one
  process), with the mean over its first 8 (the set earlier runs used) in the JSON;
* file size: the GGUF file; the graphopt model directory's ``model.onnx`` + ``model.onnx.data``.

Speed is measured in ``--rounds`` interleaved rounds (every model once per round, in turn, each in
its own process), so load from other processes falls on all models alike; the table gives medians
and the load average at the start and the end. Threads: ``--threads`` for llama.cpp's
``n_threads`` and ``n_threads_batch`` and for ONNX Runtime's intra-op pool.
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
sys.path.insert(0, str(ROOT / "tools"))
ANSWER_TOKENS = 64

PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for learning a new language.",
)
# llama.cpp file types (llama.h's llama_ftype) made from the source GGUF.
LLAMA_FTYPES = {"F32": 0, "Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}
# graphopt quantize options per model key (None: the fused float model itself).
GRAPHOPT_VARIANTS = {"fp32": None, "int8": ["--weights", "int8"], "int4": ["--weights", "int4"],
                     "int8-norot": ["--weights", "int8", "--rotation", "none"],
                     "int4-rtn-awq": ["--weights", "int4", "--method", "rtn", "--awq"]}
# Rows of the table, in order: (name, runtime, model key); pairs at the same bits sit together.
VARIANTS = (
    ("graphopt fp32 (fused)", "graphopt", "fp32"),
    ("llama.cpp F32", "llama", "F32"),
    ("graphopt int8 (default)", "graphopt", "int8"),
    ("llama.cpp Q8_0", "llama", "Q8_0"),
    # The int8 default before it rotated (online Hadamard): what the rotation buys, in the same run.
    ("graphopt int8 --rotation none", "graphopt", "int8-norot"),
    ("graphopt int4 (default)", "graphopt", "int4"),
    ("llama.cpp Q4_0", "llama", "Q4_0"),
    ("llama.cpp Q4_K_M", "llama", "Q4_K_M"),
    # The source file as shipped: graphopt's default int4 reproduces its Q4_1 grid exactly.
    ("llama.cpp Q4_1 (the source GGUF)", "llama", "source"),
    ("graphopt int4 --method rtn --awq", "graphopt", "int4-rtn-awq"),
    # onnxruntime-genai's builder (`-p int4 -e cpu`) on the same checkpoint, run by genai: with --genai-int4.
    ("onnxruntime-genai builder int4", "genai", "genai-int4"),
)


# --- model preparation ----------------------------------------------------------------------------

def make_llama_models(source: pathlib.Path, work: pathlib.Path) -> dict[str, pathlib.Path]:
    import llama_cpp

    paths = {}
    for name, ftype in LLAMA_FTYPES.items():
        path = work / f"{source.stem.split('.')[0]}.{name}.gguf"
        if not path.is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            params.allow_requantize = True
            params.nthread = 2
            partial = path.with_suffix(".partial")
            code = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params)
            if code != 0:
                raise SystemExit(f"llama_model_quantize to {name} failed with code {code}")
            partial.rename(path)
        paths[name] = path
    paths["source"] = source
    return paths


def make_graphopt_models(fused: pathlib.Path, work: pathlib.Path) -> dict[str, pathlib.Path]:
    paths = {"fp32": fused}
    for name, options in GRAPHOPT_VARIANTS.items():
        if options is None:
            continue
        path = work / f"graphopt-{name}"
        if not (path / "graphopt.json").is_file():
            subprocess.run([sys.executable, "-m", "graphopt", "quantize", str(fused), "-o", str(path), "--force",
                            *options, "--activations", "none"], check=True)
        paths[name] = path
    return paths


def size_mb(path: pathlib.Path) -> float:
    if path.is_dir():
        return sum((path / name).stat().st_size for name in ("model.onnx", "model.onnx.data")
                   if (path / name).is_file()) / 1e6
    return path.stat().st_size / 1e6


# --- worker: one process per model and round ------------------------------------------------------

class GraphoptRunner:
    def __init__(self, model_dir: str, threads: int):
        from graphopt.runtime.device import open_decoder
        from graphopt.modeldir import ModelDir

        self.decoder = open_decoder(ModelDir.open(model_dir).model_path, ep="cpu", threads=threads)

    def forward_last(self, ids: list[int]) -> np.ndarray:
        return self.decoder.forward(ids)[-1]

    def reset(self, capacity: int) -> None:
        self.decoder.reset()
        self.decoder.reserve(capacity)


class LlamaRunner:
    def __init__(self, gguf: str, threads: int, n_ctx: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(gguf, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=n_ctx,
                                   n_ubatch=n_ctx, verbose=False)

    def forward_last(self, ids: list[int]) -> np.ndarray:
        self.llm.eval(ids)
        # Without logits_all, llama-cpp-python 0.3 no longer copies logits into Llama.scores; read
        # the context's own buffer (the last position's logits).
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))

    def reset(self, capacity: int) -> None:
        # n_tokens back to 0: the next eval() drops the cached positions from there on.
        self.llm.reset()


class GenaiRunner:
    """onnxruntime-genai on its own builder's model (``--genai-int4``), at the same thread count."""

    def __init__(self, model_dir: str, threads: int):
        import onnxruntime_genai as og

        config = og.Config(model_dir)
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.og, self.model, self.generator = og, og.Model(config), None

    def forward_last(self, ids: list[int]) -> np.ndarray:
        self.generator.append_tokens(ids)
        return np.asarray(self.generator.get_output("logits"))[0, -1]

    def reset(self, capacity: int) -> None:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=capacity, do_sample=False)
        self.generator = self.og.Generator(self.model, params)


RUNNERS = {"graphopt": lambda spec: GraphoptRunner(spec["path"], spec["threads"]),
           "genai": lambda spec: GenaiRunner(spec["path"], spec["threads"]),
           "llama": lambda spec: LlamaRunner(spec["path"], spec["threads"], n_ctx=max(1024, spec["prefill"] + 8))}


def worker(args) -> None:
    """Runs in a fresh process: first token of the first prompt, then the timed work; prints one JSON line."""
    spec = json.loads(args.worker)
    runner = RUNNERS[spec["runtime"]](spec)
    prompts, tokens = spec["prompts"], spec["tokens"]
    runner.reset(len(prompts[0]) + tokens + 1)
    first_token = int(np.argmax(runner.forward_last(prompts[0])))
    first_token_at = time.time()
    answers, decode_rates = [], []
    for index, prompt in enumerate(prompts):
        if index:
            runner.reset(len(prompt) + tokens + 1)
            token = int(np.argmax(runner.forward_last(prompt)))
        else:
            token = first_token
        generated = [token]
        started = time.perf_counter()
        for _ in range(tokens - 1):
            token = int(np.argmax(runner.forward_last([token])))
            generated.append(token)
        decode_rates.append((tokens - 1) / (time.perf_counter() - started))
        answers.append(generated)
    prefill_ids = spec["prefill_ids"]
    prefill_ms = []
    for _ in range(2):
        runner.reset(len(prefill_ids) + 1)
        started = time.perf_counter()
        runner.forward_last(prefill_ids)
        prefill_ms.append((time.perf_counter() - started) * 1e3)
    print(json.dumps({"first_token_at": first_token_at, "decode_tokens_per_s": decode_rates,
                      "prefill_ms": min(prefill_ms), "answers": answers}))


def run_worker(runtime: str, path: pathlib.Path, threads: int, prompts, tokens: int, prefill_ids) -> dict:
    spec = json.dumps({"runtime": runtime, "path": str(path), "threads": threads, "prompts": prompts,
                       "tokens": tokens, "prefill": len(prefill_ids), "prefill_ids": prefill_ids})
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    started = time.time()
    completed = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True,
                               env=environment)
    if completed.returncode != 0:
        raise SystemExit(f"{runtime} worker on {path} failed:\n{completed.stderr[-2000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["time_to_first_token_s"] = result.pop("first_token_at") - started
    return result


# --- perplexity -----------------------------------------------------------------------------------

def llama_perplexity(gguf: pathlib.Path, windows: list[list[int]], threads: int) -> float:
    from graphopt.evaluate import log_softmax

    import llama_cpp

    window = len(windows[0]) - 1
    llm = llama_cpp.Llama(str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=window + 8,
                          n_batch=window + 8, n_ubatch=window + 8, logits_all=True, verbose=False)
    total, count = 0.0, 0
    for ids in windows:
        llm.reset()
        llm.eval(ids[:-1])
        logprobs = log_softmax(np.asarray(llm.scores[:window], dtype=np.float32))
        total -= float(logprobs[np.arange(window), ids[1:]].sum())
        count += window
    return float(np.exp(total / count))


def llama_token_ids(gguf: pathlib.Path, text: str) -> list[int]:
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def cache_key(path: pathlib.Path, windows: int | None) -> str:
    """A model file's identity for the perplexity cache: path, size and modification time, and the windows."""
    file = path / "model.onnx.data" if path.is_dir() else path
    status = file.stat()
    return f"{path.resolve()}|{status.st_size}|{int(status.st_mtime)}|windows={windows or 'all'}"


def answers(runtime: str, path: pathlib.Path, threads: int, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """Greedy answers of ``tokens`` tokens to each prompt (untimed, in this process)."""
    runner = RUNNERS[runtime]({"path": str(path), "threads": threads, "prefill": max(map(len, prompts)) + tokens})
    result = []
    for prompt in prompts:
        runner.reset(len(prompt) + tokens + 1)
        generated = [int(np.argmax(runner.forward_last(prompt)))]
        while len(generated) < tokens:
            generated.append(int(np.argmax(runner.forward_last(generated[-1:]))))
        result.append(generated)
    return result


# --- report ---------------------------------------------------------------------------------------

def plot(rows: list[dict], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed_axis, quality_axis) = plt.subplots(1, 2, figsize=(11, 0.8 + 0.5 * len(rows)), sharey=True)
    labels = [row["name"] for row in rows][::-1]
    palette = {"graphopt": "tab:blue", "llama": "tab:orange", "genai": "tab:green"}
    colors = [palette[row["runtime"]] for row in rows][::-1]
    speed_axis.barh(labels, [row["decode_tokens_per_s"] for row in rows][::-1], color=colors)
    for position, row in enumerate(rows[::-1]):
        speed_axis.text(row["decode_tokens_per_s"], position, f" {row['decode_tokens_per_s']:.0f}", va="center",
                        fontsize=8)
    speed_axis.set_xlabel("decode tokens/s (median, interleaved rounds)")
    quality_axis.barh(labels, [row["perplexity_increase_percent"] for row in rows][::-1], color=colors)
    for position, row in enumerate(rows[::-1]):
        quality_axis.text(max(row["perplexity_increase_percent"], 0), position,
                          f" {row['perplexity_increase_percent']:+.1f}%", va="center", fontsize=8)
    quality_axis.set_xlabel("perplexity vs graphopt fp32, eval-gpl3 (lower is better)")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--gguf", type=pathlib.Path)
    parser.add_argument("--fused", type=pathlib.Path, help="graphopt model directory fused for cpu (float)")
    parser.add_argument("--work", type=pathlib.Path, help="where the quantized models are made and kept")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the chat prompts to use")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--windows", type=int, default=None, help="perplexity windows (default: all of the text)")
    parser.add_argument("--variants", nargs="*", default=None, help="names of rows to run (default: all)")
    parser.add_argument("--genai-int4", type=pathlib.Path, default=None, metavar="BUILT",
                        help="onnxruntime-genai builder's int4 model of the same checkpoint (python -m "
                             "onnxruntime_genai.models.builder -i CKPT -o BUILT -p int4 -e cpu); its row is "
                             "left out without it")
    parser.add_argument("--no-perplexity", action="store_true")
    parser.add_argument("--json", type=pathlib.Path, default=None)
    parser.add_argument("--png", type=pathlib.Path, default=None)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if not (args.gguf and args.fused and args.work):
        parser.error("--gguf, --fused and --work are required")

    import llama_cpp
    import onnxruntime

    from graphopt.evaluate import DEFAULT_TEXT, evaluate, read_text, text_windows
    from graphopt.runtime.tokenizer import Tokenizer

    args.work.mkdir(parents=True, exist_ok=True)
    llama_paths = make_llama_models(args.gguf, args.work)
    graphopt_paths = make_graphopt_models(args.fused, args.work)
    genai_paths = {"genai-int4": args.genai_int4} if args.genai_int4 else {}
    variants = [variant for variant in VARIANTS if (args.variants is None or variant[0] in args.variants
                or variant[2] in args.variants) and (variant[1] != "genai" or variant[2] in genai_paths)]
    sources = {"graphopt": graphopt_paths, "genai": genai_paths, "llama": llama_paths}
    paths = {name: sources[runtime][key] for name, runtime, key in variants}

    tokenizer = Tokenizer(args.fused)
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]))
               for text in PROMPTS[:args.prompts]]
    text = read_text(DEFAULT_TEXT)
    text_ids = tokenizer.encode(text)
    llama_ids = llama_token_ids(llama_paths["Q8_0"], text)
    same_ids = llama_ids == text_ids
    prefill_ids = text_ids[:args.prefill]

    load_start = os.getloadavg()
    results: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    for round_index in range(args.rounds):
        for name, runtime, _ in variants:
            results[name].append(run_worker(runtime, paths[name], args.threads, prompts, args.tokens, prefill_ids))
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"{name} {statistics.median(results[name][-1]['decode_tokens_per_s']):.1f}" for name, _, _ in variants),
            flush=True)
    load_after_speed = os.getloadavg()

    perplexities: dict[str, float] = {}
    if not args.no_perplexity:
        # Perplexity does not depend on load, and costs minutes per model on 2 cores: it is kept in
        # WORK/perplexities.json, keyed by the model file's path, size and time, and reused.
        cache_path = args.work / "perplexities.json"
        cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
        windows = text_windows(text_ids, 512, args.windows)
        for name, runtime, _ in variants:
            key = cache_key(paths[name], args.windows)
            if key not in cache:
                if runtime == "graphopt":
                    cache[key] = evaluate(paths[name], DEFAULT_TEXT, window=512, max_windows=args.windows).perplexity
                elif runtime == "genai":
                    from bench_genai_builder import genai_perplexity

                    cache[key] = genai_perplexity(GenaiRunner(str(paths[name]), args.threads).model, windows)
                else:
                    cache[key] = llama_perplexity(paths[name], windows, args.threads)
                cache_path.write_text(json.dumps(cache, indent=1) + "\n")
            perplexities[name] = cache[key]
            print(f"perplexity {name}: {perplexities[name]:.3f}", flush=True)
    # Answers kept, as the int4-quality issue defines it: the chat prompts of tools/bench_int4.py,
    # 64 greedy tokens, mean index of the first token that differs from the fp32 model's.
    from bench_int4 import CHAT_PROMPTS, FIRST

    from graphopt.optimize import kept_tokens

    answer_prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]))
                      for text in CHAT_PROMPTS]
    kept_answers = {name: answers(runtime, paths[name], args.threads, answer_prompts, ANSWER_TOKENS)
                    for name, runtime, _ in variants}
    load_end = os.getloadavg()

    reference_name = next((name for name, runtime, key in variants if runtime == "graphopt" and key == "fp32"), None)
    reference_answers = results[reference_name][0]["answers"] if reference_name else None
    reference_perplexity = perplexities.get(reference_name) if reference_name else None
    rows = []
    for name, runtime, key in variants:
        runs = results[name]
        row = {"name": name, "runtime": runtime, "model": key, "path": str(paths[name]), "size_mb": size_mb(paths[name]),
               "decode_tokens_per_s": statistics.median(rate for run in runs for rate in run["decode_tokens_per_s"]),
               "decode_rounds": [statistics.median(run["decode_tokens_per_s"]) for run in runs],
               "prefill_ms": statistics.median(run["prefill_ms"] for run in runs),
               "time_to_first_token_s": statistics.median(run["time_to_first_token_s"] for run in runs)}
        if name in perplexities:
            row["perplexity"] = perplexities[name]
            if reference_perplexity:
                row["perplexity_increase_percent"] = 100 * (perplexities[name] / reference_perplexity - 1)
        if reference_answers is not None:
            divergences = [kept_tokens(answer, reference) for answer, reference
                           in zip(runs[0]["answers"], reference_answers)]
            row["first_divergence_from_fp32_mean"] = statistics.mean(divergences)
            kept = [kept_tokens(answer, reference)
                    for answer, reference in zip(kept_answers[name], kept_answers[reference_name])]
            row["answers_kept_32x64"] = statistics.mean(kept)
            row["answers_kept_first8"] = statistics.mean(kept[:FIRST])
        rows.append(row)

    by_key = {row["model"]: row for row in rows}
    ratios = {}
    for mine, theirs in (("int8", "Q8_0"), ("int4", "Q4_0"), ("int4", "Q4_K_M"), ("int4", "source"),
                         ("int4-rtn-awq", "Q4_0"), ("int8", "int8-norot"), ("int4", "genai-int4")):
        if mine in by_key and theirs in by_key:
            ratios[f"graphopt {mine} / {by_key[theirs]['name']}"] = (
                by_key[mine]["decode_tokens_per_s"] / by_key[theirs]["decode_tokens_per_s"])
    cpu = next((line.split(":", 1)[1].strip() for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if pathlib.Path("/proc/cpuinfo").exists() else ""
    header = (f"{cpu}, {os.cpu_count()} cores; {args.threads} threads each; onnxruntime {onnxruntime.__version__}, "
              f"llama-cpp-python {llama_cpp.__version__}; load average {load_start[0]:.2f} at the start, "
              f"{load_after_speed[0]:.2f} after the speed rounds, {load_end[0]:.2f} at the end; {args.rounds} "
              f"interleaved rounds x {len(prompts)} chat prompts x {args.tokens} greedy tokens; prefill "
              f"{len(prefill_ids)} tokens; perplexity on graphopt's token ids for both runtimes ({len(text_ids)} tokens; "
              f"llama.cpp's own tokenizer gives {'the same ids' if same_ids else f'{len(llama_ids)}, merging whitespace runs'})")
    print("\n" + header)
    print(f"{'model':<34}{'decode tok/s':>13}{'prefill ms':>11}{'TTFT s':>8}{'perplexity':>11}{'vs fp32':>9}"
          f"{'same tokens':>12}{'kept 32x64':>11}{'MB':>8}")
    for row in rows:
        print(f"{row['name']:<34}{row['decode_tokens_per_s']:>13.1f}{row['prefill_ms']:>11.0f}"
              f"{row['time_to_first_token_s']:>8.2f}{row.get('perplexity', float('nan')):>11.3f}"
              f"{row.get('perplexity_increase_percent', float('nan')):>+8.1f}%"
              f"{row.get('first_divergence_from_fp32_mean', float('nan')):>12.1f}"
              f"{row.get('answers_kept_32x64', float('nan')):>11.1f}{row['size_mb']:>8.1f}")
    for label, ratio in ratios.items():
        print(f"{label}: {ratio:.2f}x decode")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": header, "load_average": {"start": load_start,
                                         "after_speed": load_after_speed, "end": load_end},
                                         "ratios": ratios, "rows": rows, "same_token_ids": same_ids}, indent=1) + "\n")
    if args.png and all("perplexity_increase_percent" in row for row in rows):
        plot(rows, args.png, header[:160])


if __name__ == "__main__":
    main()
