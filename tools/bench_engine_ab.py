"""A/B of the continuous-batching engine: ``graphopt/runtime/batching.py`` at a git revision against the tree's.

    python tools/bench_engine_ab.py MODEL_DIR [--base REV] [--batch 8] [--rounds 4] [--tokens 128] [--json OUT]

Both engines run in this process on the same model and provider (the older module is loaded from
``git show REV:graphopt/runtime/batching.py`` beside the current one, so only the engine differs),
in interleaved rounds (old, new, new, old, ...); each round decodes ``--batch`` chat prompts
together, greedily, ``--tokens`` each (EOS ignored), prefills included. Prints each round's
aggregate tokens/s, the medians, the median of per-round ratios and whether both produced the same
tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = ("Write a short paragraph about the history of Paris.", "What is the capital of France?",
           "Explain how a refrigerator works.", "Give me three tips for staying focused.",
           "Write a haiku about autumn leaves.", "Why is the sky blue?", "How do vaccines work?",
           "What is photosynthesis?")


def engine_at(revision: str, directory: pathlib.Path):
    """The batching module as it was at ``revision`` (importable as ``batching_at_REV``)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:graphopt/runtime/batching.py"],
                            check=True, capture_output=True, text=True).stdout
    name = f"batching_at_{revision.replace('-', '_').replace('~', '_')}"
    path = directory / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--base", default="HEAD", help="the revision of the older engine")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--ep", default="cpu")
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args()

    from graphopt.runtime import batching

    with tempfile.TemporaryDirectory() as scratch:
        modules = {"old": engine_at(args.base, pathlib.Path(scratch)), "new": batching}
        engines = {name: module.BatchEngine(args.model_dir, ep=args.ep, max_batch=args.batch,
                                            context=64 + args.tokens) for name, module in modules.items()}
        speeds = {name: [] for name in engines}
        tokens = {}
        for round_index in range(args.rounds):
            for name in (list(engines) if round_index % 2 == 0 else list(engines)[::-1]):
                engine, module = engines[name], modules[name]
                requests = [module.BatchRequest(tuple(engine.tokenizer.encode(PROMPTS[index % len(PROMPTS)])),
                                                max_new_tokens=args.tokens, stop_on_eos=False)
                            for index in range(args.batch)]
                engine.generate(requests[:1])  # warm: the first run of a shape
                started = time.perf_counter()
                sequences = engine.generate(requests)
                seconds = time.perf_counter() - started
                speeds[name].append(sum(len(sequence.token_ids) for sequence in sequences) / seconds)
                tokens[name] = [sequence.token_ids for sequence in sequences]
                print(f"round {round_index + 1}/{args.rounds}: {name} {speeds[name][-1]:.1f} tokens/s", flush=True)
    ratio = statistics.median(new / old for new, old in zip(speeds["new"], speeds["old"]))
    result = {"model": args.model_dir, "base": args.base, "batch": args.batch, "tokens": args.tokens, "ep": args.ep,
              "tokens_per_s": speeds, "median": {name: statistics.median(values) for name, values in speeds.items()},
              "ratio_new_over_old": ratio, "same_tokens": tokens["old"] == tokens["new"]}
    print(f"old {result['median']['old']:.1f}, new {result['median']['new']:.1f} aggregate tokens/s (medians); "
          f"new/old {ratio:.3f}; same tokens: {result['same_tokens']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
