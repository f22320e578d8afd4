"""An edge app: chat with a graphopt model using only onnxruntime, numpy, tokenizers and jinja2.

    python app.py MODEL [--prompt TEXT] [--max-new-tokens N] [--temperature T] [--json]

MODEL is a `graphopt optimize` output directory (its ``target/`` is used), or any graphopt model
directory, with ``model.onnx`` or the ORT-format ``model.ort`` of ``tools/to_ort_format.py``.
No torch, no transformers: the app imports ``graphopt.runtime`` (install graphopt with
``pip install --no-deps graphopt``, or copy the ``graphopt`` package beside this file), which needs
only the four packages above. Without ``--prompt`` it reads prompts from stdin, one per line.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

from graphopt.runtime.decoder import Decoder
from graphopt.runtime.sampling import GREEDY, Sampling, choose
from graphopt.runtime.tokenizer import Tokenizer


class EdgeModel:
    """A model directory's decoder, tokenizer and stop tokens."""

    def __init__(self, path: pathlib.Path, threads: int | None = None):
        if (path / "target" / "graphopt.json").is_file():
            path = path / "target"
        manifest = json.loads((path / "graphopt.json").read_text())
        model_file = path / manifest.get("model_file", "model.onnx")
        self.decoder = Decoder(model_file, ep="cpu", threads=threads)
        self.tokenizer = Tokenizer(path)
        self.eos_token_ids = set(manifest.get("eos_token_ids", []))
        self.path = path

    def reply(self, prompt: str, max_new_tokens: int, sampling: Sampling, on_text=None) -> dict:
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        prompt_ids = self.tokenizer.encode(text)
        rng = np.random.default_rng(sampling.seed)
        self.decoder.reset()
        started = time.perf_counter()
        token = choose(self.decoder.forward(prompt_ids)[-1], sampling, rng)
        generated = [token]
        while token not in self.eos_token_ids and len(generated) < max_new_tokens:
            if on_text is not None:
                on_text(self.tokenizer.decode(generated[-1:]))
            token = choose(self.decoder.forward([token])[-1], sampling, rng)
            generated.append(token)
        seconds = time.perf_counter() - started
        return {"prompt": prompt, "text": self.tokenizer.decode(generated), "new_tokens": len(generated),
                "tokens_per_s": len(generated) / seconds if seconds > 0 else 0.0,
                "provider": self.decoder.provider}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Chat with a graphopt model (onnxruntime only).")
    parser.add_argument("model", type=pathlib.Path)
    parser.add_argument("--prompt", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="Print one JSON object per prompt.")
    arguments = parser.parse_args(argv)
    if not (arguments.model / "graphopt.json").is_file() and not (arguments.model / "target" / "graphopt.json").is_file():
        print(f"error: {arguments.model}: not a graphopt model directory or optimize output", file=sys.stderr)
        return 2
    model = EdgeModel(arguments.model, threads=arguments.threads)
    sampling = GREEDY if arguments.temperature == 0 else Sampling(temperature=arguments.temperature, seed=arguments.seed)
    prompts = [arguments.prompt] if arguments.prompt is not None else (line.strip() for line in sys.stdin)
    for prompt in prompts:
        if not prompt:
            continue
        if arguments.json:
            print(json.dumps(model.reply(prompt, arguments.max_new_tokens, sampling)), flush=True)
        else:
            result = model.reply(prompt, arguments.max_new_tokens, sampling,
                                 on_text=lambda piece: print(piece, end="", flush=True))
            print(f"\n[{result['new_tokens']} tokens, {result['tokens_per_s']:.1f} tokens/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
