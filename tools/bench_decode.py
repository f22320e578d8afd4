"""Prefill ms and decode tokens/s: graphopt's ONNX Runtime model vs transformers' generate.

    python tools/bench_decode.py MODEL_DIR [--src smollm2-135m] [--tokens 128] [--repeats 3]

Both run greedy for exactly ``--tokens`` new tokens (EOS ignored) from the same chat prompt on the
same machine; the best of ``--repeats`` runs is reported, and the generated tokens are compared.
Prints a table; with ``--plot FILE`` also writes a bar chart.
"""

from __future__ import annotations

import argparse
import platform
import time

PROMPT = "Write a short paragraph about the history of Paris."


def machine() -> str:
    import os

    import onnxruntime
    import torch

    return (f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or 'cpu'}; "
            f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}")


def bench_graphopt(model_dir: str, tokens: int, repeats: int, threads: int | None):
    from graphopt.runtime import Generator

    generator = Generator(model_dir, threads=threads)
    prompt_ids = generator.encode_prompt(PROMPT, chat=True)
    runs = [generator.generate(prompt_ids, max_new_tokens=tokens, stop_on_eos=False) for _ in range(repeats)]
    best = max(runs, key=lambda run: run.decode_tokens_per_s)
    return prompt_ids, {"prefill_ms": min(run.prefill_ms for run in runs),
                        "decode_tokens_per_s": best.decode_tokens_per_s, "token_ids": best.token_ids}


def bench_transformers(src: str, prompt_ids: list[int], tokens: int, repeats: int):
    """transformers' own generate: prefill timed as a 1-token generate, decode as the rest."""
    import torch

    from graphopt.checkpoint import greedy_tokens, load

    model = load(src).model
    ids = torch.tensor([prompt_ids])
    prefill, decode, token_ids = [], [], []
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False)
            prefill_s = time.perf_counter() - started
            started = time.perf_counter()
            token_ids = greedy_tokens(model, prompt_ids, tokens)
            total_s = time.perf_counter() - started
            prefill.append(prefill_s * 1e3)
            decode.append((tokens - 1) / max(total_s - prefill_s, 1e-9))
    return {"prefill_ms": min(prefill), "decode_tokens_per_s": max(decode), "token_ids": token_ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--src", default="smollm2-135m", help="checkpoint for transformers (registry name or path)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: all cores)")
    parser.add_argument("--plot", default=None, help="write a PNG bar chart here")
    args = parser.parse_args()

    prompt_ids, ours = bench_graphopt(args.model_dir, args.tokens, args.repeats, args.threads)
    theirs = bench_transformers(args.src, prompt_ids, args.tokens, args.repeats)
    same = ours["token_ids"] == theirs["token_ids"]
    agree = next((i for i, (a, b) in enumerate(zip(ours["token_ids"], theirs["token_ids"])) if a != b),
                 min(len(ours["token_ids"]), len(theirs["token_ids"])))
    print(f"machine: {machine()}")
    print(f"prompt: {len(prompt_ids)} tokens; {args.tokens} greedy new tokens; best of {args.repeats}")
    print(f"{'runtime':<28}{'prefill ms':>12}{'decode tok/s':>14}")
    for name, row in (("graphopt (ONNX Runtime)", ours), ("transformers generate", theirs)):
        print(f"{name:<28}{row['prefill_ms']:>12.1f}{row['decode_tokens_per_s']:>14.1f}")
    print(f"decode speed-up: {ours['decode_tokens_per_s'] / theirs['decode_tokens_per_s']:.2f}x; "
          f"identical tokens: {same} (first {agree} of {args.tokens} agree)")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(5, 3))
        axis.bar(["graphopt ORT", "transformers"], [ours["decode_tokens_per_s"], theirs["decode_tokens_per_s"]])
        axis.set_ylabel("decode tokens/s")
        axis.set_title(f"{args.tokens} greedy tokens, batch 1")
        figure.tight_layout()
        figure.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
