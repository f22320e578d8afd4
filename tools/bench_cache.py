"""Decode speed by where the KV cache lives, at growing context lengths.

    python tools/bench_cache.py FUSED_DIR [--ep cpu] [--contexts 64 512 1536] [--tokens 64] [--rounds 2]

Caches (``graphopt.runtime.open_decoder``): ``host`` (numpy, the cache copied in and out every
step), ``device`` (OrtValues rebound each step, growing), ``static`` (fixed buffers that
GroupQueryAttention writes in place; needs a model fused for cpu or cuda). For each context
length a random prompt of that many tokens is prefilled (not timed), then ``--tokens`` greedy
steps are timed. Rounds are interleaved (host, device, static, host, ...) so that load from other
processes hits every cache alike; the table shows the median over rounds and checks that every
cache produced the same greedy tokens. ``--png`` draws tokens/s against context length.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CACHES = ("host", "device", "static")


def decode(decoder, prompt: list[int], tokens: int) -> tuple[float, list[int]]:
    """Prefill ``prompt`` (untimed), then time ``tokens`` greedy steps; tokens/s and the ids."""
    decoder.reset()
    decoder.reserve(len(prompt) + tokens)
    logits = decoder.forward(prompt)[-1]
    generated = []
    started = time.perf_counter()
    for _ in range(tokens):
        generated.append(int(np.argmax(logits)))
        logits = decoder.forward(generated[-1:])[-1]
    return tokens / (time.perf_counter() - started), generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=pathlib.Path, help="a model directory fused with GroupQueryAttention")
    parser.add_argument("--ep", default="cpu")
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 512, 1536])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--png", type=pathlib.Path, default=None)
    args = parser.parse_args()

    import onnxruntime

    from graphopt.modeldir import ModelDir
    from graphopt.runtime.device import open_decoder

    model = ModelDir.open(args.model_dir)
    vocab = model.manifest.vocab_size
    decoders = {cache: open_decoder(model.model_path, ep=args.ep, cache=cache) for cache in CACHES}
    rng = np.random.default_rng(0)
    prompts = {length: rng.integers(100, vocab, size=length).tolist() for length in args.contexts}
    speeds = {(cache, length): [] for cache in CACHES for length in args.contexts}
    tokens = {}
    for round_index in range(args.rounds):
        for length in args.contexts:
            for cache, decoder in decoders.items():
                speed, generated = decode(decoder, prompts[length], args.tokens)
                speeds[cache, length].append(speed)
                tokens.setdefault(length, generated)
                if generated != tokens[length]:
                    sys.exit(f"{cache} cache at context {length}: greedy tokens differ from the host cache's")
            print(f"round {round_index + 1}/{args.rounds}, context {length}: "
                  + ", ".join(f"{cache} {speeds[cache, length][-1]:.1f}" for cache in CACHES), flush=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{model.path} on {args.ep}; {platform.machine()} {os.cpu_count()} cores; onnxruntime "
          f"{onnxruntime.__version__}; load {load:.2f}; {args.tokens} greedy steps after a prompt of each length, "
          f"median of {args.rounds} interleaved rounds; greedy tokens identical across caches")
    print(f"{'context':>8}" + "".join(f"{cache + ' tok/s':>16}" for cache in CACHES) + f"{'static / host':>15}")
    for length in args.contexts:
        medians = {cache: statistics.median(speeds[cache, length]) for cache in CACHES}
        print(f"{length:>8}" + "".join(f"{medians[cache]:>16.1f}" for cache in CACHES)
              + f"{medians['static'] / medians['host']:>15.2f}")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 4))
        for cache in CACHES:
            axis.plot(args.contexts, [statistics.median(speeds[cache, length]) for length in args.contexts],
                      marker="o", label=cache)
        axis.set_xlabel("context length (tokens)")
        axis.set_ylabel("decode tokens/s")
        axis.set_title(f"KV cache placement, {model.path.name} on {args.ep}", fontsize=10)
        axis.legend()
        figure.tight_layout()
        figure.savefig(args.png, dpi=120)


if __name__ == "__main__":
    main()
