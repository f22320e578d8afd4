"""Greedy tokens and timings from Hugging Face Optimum's ORTModelForCausalLM on a graphopt model directory.

Runs inside the Optimum environment (``tools/optimum_env.py`` builds it: optimum-onnx pins
transformers 4.57, graphopt's own environment has 5.x), so it imports nothing from graphopt.
Reads one JSON object on stdin: ``{"model_dir": ..., "prompts": [[ids...], ...], "max_new_tokens": N,
"sample": false}``; prints one JSON object: ``{"tokens": [[ids...], ...], "prefill_ms": [...],
"decode_tokens_per_s": [...]}``. Generation stops at the model's EOS like graphopt's.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    request = json.load(sys.stdin)
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(request["model_dir"], provider="CPUExecutionProvider")
    result = {"tokens": [], "prefill_ms": [], "decode_tokens_per_s": []}
    for prompt in request["prompts"]:
        ids = torch.tensor([prompt], dtype=torch.int64)
        mask = torch.ones_like(ids)
        options = dict(do_sample=bool(request.get("sample")), num_beams=1)
        if request.get("sample"):
            torch.manual_seed(int(request.get("seed", 0)))
            options.update(temperature=0.9, top_k=20)
        started = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, **options)
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        output = model.generate(ids, attention_mask=mask, max_new_tokens=request["max_new_tokens"], **options)
        total = time.perf_counter() - started
        new = output[0, len(prompt):].tolist()
        result["tokens"].append(new)
        result["prefill_ms"].append(prefill * 1e3)
        result["decode_tokens_per_s"].append((len(new) - 1) / max(total - prefill, 1e-9) if len(new) > 1 else 0.0)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
