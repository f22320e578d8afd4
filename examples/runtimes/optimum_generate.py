"""Generate with a graphopt model directory through Hugging Face Optimum's ORTModelForCausalLM.

    pip install optimum-onnx onnxruntime   # its own environment: optimum-onnx pins transformers 4.57
    python optimum_generate.py MODEL_DIR [--prompt TEXT] [--max-new-tokens N] [--sample]

MODEL_DIR is a directory graphopt wrote whose ``graphopt inspect`` says Optimum loads it (it then
carries ``config.json`` and ``generation_config.json``; graphs Optimum cannot run, such as pruned
query heads, have none). ``tools/optimum_env.py DIR`` builds such an environment.
"""

from __future__ import annotations

import argparse
import sys

from optimum.onnxruntime import ORTModelForCausalLM
from transformers import PreTrainedTokenizerFast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--sample", action="store_true", help="sample (temperature 0.7, top-p 0.9) instead of greedy")
    args = parser.parse_args()

    # The class by name, not AutoTokenizer: graphopt copies a transformers 5 tokenizer_config.json, whose
    # "TokenizersBackend" class transformers 4.57 (what optimum-onnx pins) does not know.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.model_dir)
    model = ORTModelForCausalLM.from_pretrained(args.model_dir, provider="CPUExecutionProvider")
    text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                         tokenize=False)
    input_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    options = dict(do_sample=True, temperature=0.7, top_p=0.9) if args.sample else dict(do_sample=False)
    output = model.generate(input_ids, attention_mask=input_ids.new_ones(input_ids.shape),
                            max_new_tokens=args.max_new_tokens, **options)
    print(tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True))


if __name__ == "__main__":
    sys.exit(main())
