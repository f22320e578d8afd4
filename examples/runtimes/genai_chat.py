"""Chat with a graphopt model directory through onnxruntime-genai: no graphopt, no torch.

    pip install onnxruntime-genai
    python genai_chat.py MODEL_DIR [--prompt TEXT] [--max-new-tokens N] [--sample] [--json]

MODEL_DIR is any directory graphopt wrote (a `graphopt optimize` output's ``target/`` too): it
carries ``genai_config.json``. These are the same calls a C#, Java, C or Objective-C app makes
(``Model``, ``Tokenizer``, ``GeneratorParams``, ``Generator``); the chat template is read from the
directory's ``chat_template.jinja`` by genai itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import onnxruntime_genai as og


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--sample", action="store_true", help="sample (temperature 0.7, top-p 0.9) instead of greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print token ids and timings as one JSON object")
    args = parser.parse_args()

    model = og.Model(args.model_dir)
    tokenizer = og.Tokenizer(model)
    messages = json.dumps([{"role": "user", "content": args.prompt}])
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    params = og.GeneratorParams(model)
    search = dict(max_length=len(prompt_ids) + args.max_new_tokens, do_sample=args.sample)
    if args.sample:
        search.update(temperature=0.7, top_p=0.9, top_k=50, random_seed=args.seed)
    params.set_search_options(**search)
    generator = og.Generator(model, params)
    stream = tokenizer.create_stream()

    started = time.perf_counter()
    generator.append_tokens(prompt_ids)
    tokens, first_at = [], None
    while not generator.is_done():
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        first_at = first_at or time.perf_counter()
        tokens.append(token)
        if not args.json:
            print(stream.decode(token), end="", flush=True)
    finished = time.perf_counter()
    if args.json:
        decode_s = finished - first_at
        print(json.dumps({"token_ids": tokens, "text": tokenizer.decode(tokens),
                          "prefill_ms": round((first_at - started) * 1e3, 3),
                          "decode_tokens_per_s": round((len(tokens) - 1) / decode_s, 3) if len(tokens) > 1 else 0.0}))
    else:
        print()


if __name__ == "__main__":
    sys.exit(main())
