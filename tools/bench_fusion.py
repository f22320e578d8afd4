"""Fused vs unfused speed on CPU: decode tokens/s (greedy) and prefill ms, per fusion target.

    python tools/bench_fusion.py SMOLLM2_DIR --targets cpu onnx --repeats 3 --png bench_fusion.png

Fuses MODEL_DIR for each target into a scratch directory (or takes already fused directories
with ``--fused TARGET=DIR``), then measures every variant in interleaved rounds (plain, cpu,
onnx, plain, cpu, ...) so that load from other processes on a shared machine hits all variants
alike; reports the median and the best round, the load average before and after, and checks that
every variant produces the same greedy tokens. ``cuda`` and ``tensorrt`` produce the same graphs as
``cpu`` and ``onnx``; on a CPU-only machine they are measured as those.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

from graphopt.fusion import fuse
from graphopt.runtime.decoder import Decoder
from graphopt.runtime.session import make_session

PROMPT = [1, 504, 3458, 282, 4649, 314]  # "The capital of France is" in SmolLM2's vocabulary


def decode_tokens_per_second(decoder: Decoder, tokens: int, vocab_size: int) -> tuple[float, float, list[int]]:
    """Prefill the prompt (untimed), then time ``tokens`` greedy one-token steps.

    Returns tokens per wall-clock second, this process' CPU milliseconds per token (steadier than
    wall time when other processes compete for the cores, though spinning ORT threads count in
    it) and the tokens.
    """
    decoder.reset()
    logits = decoder.forward([token % vocab_size for token in PROMPT])[-1]
    produced = []
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(tokens):
        produced.append(int(np.argmax(logits)))
        logits = decoder.forward(produced[-1:])[-1]
    cpu_ms = (time.process_time() - cpu_started) * 1000 / tokens
    return tokens / (time.perf_counter() - started), cpu_ms, produced


def prefill_ms(decoder: Decoder, length: int, vocab_size: int) -> float:
    ids = np.random.default_rng(0).integers(0, vocab_size, size=length).tolist()
    decoder.reset()
    started = time.perf_counter()
    decoder.forward(ids)
    return (time.perf_counter() - started) * 1000


def _session(path: pathlib.Path, threads: int | None, no_spinning: bool):
    """The runtime's own session (graphopt.runtime.session), or one with spinning off."""
    if not no_spinning:
        return make_session(path, threads=threads)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=pathlib.Path, help="plain (unfused) exported model directory")
    parser.add_argument("--targets", nargs="+", default=["cpu", "onnx"], choices=["cpu", "cuda", "tensorrt", "onnx"])
    parser.add_argument("--fused", action="append", default=[], metavar="NAME=DIR",
                        help="use an already fused directory for target NAME, or add it as variant NAME")
    parser.add_argument("--tokens", type=int, default=128, help="greedy decode steps timed")
    parser.add_argument("--prefill", type=int, default=512, help="prompt length for the prefill timing")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds over all variants")
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's choice)")
    parser.add_argument("--no-spinning", action="store_true",
                        help="ORT worker threads sleep instead of spinning between ops (kinder to a shared machine)")
    parser.add_argument("--png", type=pathlib.Path, default=pathlib.Path("bench_fusion.png"))
    args = parser.parse_args(argv)

    import json

    manifest = json.loads((args.model_dir / "graphopt.json").read_text())
    vocab_size = int(manifest["vocab_size"])
    given = dict(item.split("=", 1) for item in args.fused)
    scratch = tempfile.TemporaryDirectory(prefix="bench-fusion-")
    variants = {"plain": args.model_dir / "model.onnx"}
    for target in args.targets:
        if target in given:
            variants[target] = pathlib.Path(given[target]) / "model.onnx"
        else:
            print(f"fusing for {target} ...", file=sys.stderr)
            fused, _counts = fuse(args.model_dir, pathlib.Path(scratch.name) / target, target, validate=False)
            variants[target] = fused.model_path
    for name, directory in given.items():  # further variants, e.g. another fusion setting
        variants.setdefault(name, pathlib.Path(directory) / "model.onnx")

    load_before = os.getloadavg()
    decoders = {name: Decoder(path, session=_session(path, args.threads, args.no_spinning)) for name, path in variants.items()}
    decode: dict[str, list[float]] = {name: [] for name in variants}
    decode_cpu: dict[str, list[float]] = {name: [] for name in variants}
    prefill: dict[str, list[float]] = {name: [] for name in variants}
    greedy: dict[str, list[int]] = {}
    for name, decoder in decoders.items():  # warm-up: first runs allocate and pick kernels
        prefill_ms(decoder, min(64, args.prefill), vocab_size)
    for round_index in range(args.repeats):
        for name, decoder in decoders.items():
            rate, cpu_ms, tokens = decode_tokens_per_second(decoder, args.tokens, vocab_size)
            decode[name].append(rate)
            decode_cpu[name].append(cpu_ms)
            greedy.setdefault(name, tokens)
            prefill[name].append(prefill_ms(decoder, args.prefill, vocab_size))
        print(f"round {round_index + 1}/{args.repeats}: " + ", ".join(
            f"{name} {decode[name][-1]:.1f} tok/s {prefill[name][-1]:.0f} ms" for name in variants), file=sys.stderr)
    load_after = os.getloadavg()

    plain_decode, plain_prefill = statistics.median(decode["plain"]), statistics.median(prefill["plain"])
    print(f"model: {args.model_dir}  threads: {args.threads or 'ORT default'}  spinning: {not args.no_spinning}  "
          f"cores: {os.cpu_count()}  "
          f"rounds: {args.repeats}  load avg (1m) before/after: {load_before[0]:.2f}/{load_after[0]:.2f}")
    width = max(8, *(len(name) for name in variants))
    header = (f"{'variant':<{width}} {'decode tok/s':>12} {'best':>7} {'x plain':>8} {'cpu ms/tok':>10} "
              f"{f'prefill {args.prefill} ms':>16} {'best':>7} {'x plain':>8}")
    print(header)
    print("-" * len(header))
    rows = []
    for name in variants:
        rate, ms = statistics.median(decode[name]), statistics.median(prefill[name])
        rows.append((name, rate, ms))
        print(f"{name:<{width}} {rate:>12.1f} {max(decode[name]):>7.1f} {rate / plain_decode:>8.2f} "
              f"{statistics.median(decode_cpu[name]):>10.1f} {ms:>16.0f} {min(prefill[name]):>7.0f} {plain_prefill / ms:>8.2f}")
    same = all(tokens == greedy["plain"] for tokens in greedy.values())
    print(f"greedy tokens identical across variants: {same}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [row[0] for row in rows]
    left.bar(names, [row[1] for row in rows], color="tab:blue")
    left.set_title(f"decode, {args.tokens} greedy tokens (tokens/s, higher is better)", fontsize=9)
    right.bar(names, [row[2] for row in rows], color="tab:orange")
    right.set_title(f"prefill, {args.prefill} tokens (ms, lower is better)", fontsize=9)
    figure.suptitle(f"{args.model_dir.name} {manifest.get('dtype', '')}, ONNX Runtime CPU, {os.cpu_count()} cores "
                    f"(median of {args.repeats} rounds, load avg {load_before[0]:.1f} -> {load_after[0]:.1f})", fontsize=10)
    figure.tight_layout()
    figure.savefig(args.png, dpi=120)
    print(f"plot: {args.png}")
    scratch.cleanup()
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
