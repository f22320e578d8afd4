"""Check `export --keep-quantization` on a real GGUF: logits of the imported ONNX model vs the dequantized-GGUF PyTorch model.

    python tools/check_gguf_import.py --gguf MODEL.gguf --imported DIR [--imported DIR ...] [--out JSON]

PyTorch: transformers loading the GGUF (llama.cpp's dequantization to float32), as graphopt's
export does. ONNX: each imported model directory (MatMulNBits with the GGUF's own blocks), on
ONNX Runtime's CPU provider. Prints max |logits diff| on two prompts (prefill) and whether the
greedy next tokens agree, and writes a JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

import numpy as np

PROMPTS = ["The capital of France is", "In the beginning the Universe was created. This has made a lot of people very angry"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--imported", action="append", required=True, type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()

    import torch

    from graphopt.checkpoint import load
    from graphopt.modeldir import ModelDir
    from graphopt.runtime.decoder import Decoder

    checkpoint = load(args.gguf)
    rows = []
    for directory in args.imported:
        model_dir = ModelDir.open(directory)
        decoder = Decoder(model_dir.model_path)
        step = model_dir.manifest.lineage[-1]
        worst = 0.0
        agree = True
        for prompt in PROMPTS:
            ids = checkpoint.tokenizer.encode(prompt)
            with torch.no_grad():
                expected = checkpoint.model(torch.tensor([ids])).logits[0].numpy()
            decoder.reset()
            got = decoder.forward(ids)
            worst = max(worst, float(np.abs(got - expected).max()))
            agree = agree and bool((got.argmax(-1) == expected.argmax(-1)).all())
        row = {"imported": str(directory), "gguf": os.path.basename(args.gguf),
               "accuracy_level": step.parameters.get("accuracy_level"), "exact": step.figures.get("exact"),
               "max_abs_logits_diff": worst, "argmax_agree": agree, "size_bytes": model_dir.size_bytes(),
               "gguf_size_bytes": os.path.getsize(args.gguf)}
        rows.append(row)
        print(f"{directory}: exact {row['exact']}, accuracy_level {row['accuracy_level']}, max |logits diff| vs "
              f"PyTorch {worst:.2e}, argmax agree {agree}, {row['size_bytes'] / 1e6:.1f} MB "
              f"(GGUF {row['gguf_size_bytes'] / 1e6:.1f} MB)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
