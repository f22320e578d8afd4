"""Generate with a graphopt model directory through graphopt's own torch-free runtime.

    pip install --no-deps graphopt && pip install onnxruntime numpy tokenizers jinja2
    python graphopt_runtime.py MODEL_DIR [--prompt TEXT] [--max-new-tokens N] [--sample]

``graphopt.runtime`` needs only onnxruntime, numpy, tokenizers and jinja2 (chat templates render
in a sandbox); on CPU it keeps the KV cache in place for GroupQueryAttention graphs, on CUDA it
replays one-token steps as a CUDA graph (see README, Python API).
"""

from __future__ import annotations

import argparse
import sys

from graphopt.runtime import Generator, Sampling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--sample", action="store_true", help="sample (temperature 0.7, top-p 0.9) instead of greedy")
    parser.add_argument("--ep", default="cpu", help="cpu, cuda or tensorrt")
    args = parser.parse_args()

    generator = Generator(args.model_dir, ep=args.ep)
    sampling = Sampling(temperature=0.7, top_p=0.9, seed=0) if args.sample else Sampling()
    result = generator.generate_text(args.prompt, chat=True, max_new_tokens=args.max_new_tokens, sampling=sampling)
    print(result.text)
    print(f"[{result.prefill_ms:.0f} ms prefill, {result.decode_tokens_per_s:.1f} tokens/s]", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
