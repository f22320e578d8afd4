"""GPU check for SmolLM2: export, fuse for CUDA, convert to fp16, verify CUDA against CPU, time it all.

Run on a machine with onnxruntime-gpu (see ../shared/device/README.md for a registry-less one):

    python tools/gpu_check.py --src PATH/SmolLM2-135M-Instruct.Q4_1.gguf --work /tmp/gpu-work [--out DIR]

Variants: fp32 and fp16, unfused and fused (``--target cuda``), each on CUDA with the KV cache kept on
the device (IOBinding), plus the naive path (numpy feeds, cache copied to and from the host every
step) for fp32 unfused. Numerics: prefill and decode logits vs the CPU fp32 model, and greedy tokens
vs CPU fp32 greedy. Speed: 512-token prefill ms and 128-token greedy decode tokens/s, plain and
speculative (a layer-truncated fp16 fused draft). The table is printed last; ``--out`` gets JSON.
Also runs on CPU (``--ep cpu``) with any checkpoint, to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "Write a short paragraph about the history of Paris."


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_variants(src: str, work: pathlib.Path, skip_export: bool, errors: dict[str, str]) -> dict[str, pathlib.Path]:
    """Build every variant that can be built; a failed one is logged in ``errors`` and left out."""
    from graphopt.drafting import build_draft
    from graphopt.export import export
    from graphopt.fusion import fuse
    from graphopt.convert import convert

    paths = {name: work / name for name in ("fp32", "fp32-fused", "fp16", "fp16-fused", "draft-fp32",
                                            "draft-fp32-fused", "draft-fp16-fused")}
    if not (skip_export and (paths["fp32"] / "model.onnx").is_file()):
        started = time.perf_counter()
        export(src, paths["fp32"], force=True, progress=log)
        log(f"export + validation: {time.perf_counter() - started:.0f} s")
    steps = [
        ("fp32-fused", lambda: fuse(paths["fp32"], paths["fp32-fused"], "cuda", require=True, force=True, progress=log)),
        ("fp16", lambda: convert(paths["fp32"], paths["fp16"], dtype="fp16", force=True)),
        ("fp16-fused", lambda: convert(paths["fp32-fused"], paths["fp16-fused"], dtype="fp16", force=True)),
        # The draft drops layers from the unfused graph, then takes the target's fusion and precision.
        ("draft-fp32", lambda: build_draft(paths["fp32"], paths["draft-fp32"], recipe="half-layers", force=True)),
        ("draft-fp32-fused", lambda: fuse(paths["draft-fp32"], paths["draft-fp32-fused"], "cuda", require=True,
                                          force=True)),
        ("draft-fp16-fused", lambda: convert(paths["draft-fp32-fused"], paths["draft-fp16-fused"], dtype="fp16",
                                             force=True)),
    ]
    for name, build in steps:
        try:
            build()
        except Exception as error:  # keep going: report every variant that does build
            errors[name] = f"{type(error).__name__}: {error}"
            log(f"FAILED to build {name}: {errors[name]}")
    return {name: path for name, path in paths.items() if (path / "model.onnx").is_file()}


def greedy(generator, prompt_ids: list[int], tokens: int):
    return generator.generate(prompt_ids, max_new_tokens=tokens, stop_on_eos=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default="smollm2-135m")
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/gpu-work"))
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--ep", default="cuda")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-export", action="store_true", help="reuse WORK/fp32 if present")
    args = parser.parse_args()

    import onnxruntime as ort

    from graphopt.runtime import Generator

    log(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}, python {platform.python_version()}")
    if args.ep == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        sys.exit("CUDAExecutionProvider is not available in this onnxruntime")
    args.work.mkdir(parents=True, exist_ok=True)
    errors: dict[str, str] = {}
    paths = build_variants(args.src, args.work, args.skip_export, errors)

    reference = Generator(paths["fp32"], ep="cpu")
    prompt_ids = reference.encode_prompt(PROMPT, chat=True)
    reference_tokens = greedy(reference, prompt_ids, args.tokens).token_ids
    reference.decoder.reset()
    reference_prefill = reference.decoder.forward(prompt_ids)
    reference_decode = reference.decoder.forward(reference_tokens[:4])
    long_prompt = (prompt_ids * (args.prefill // len(prompt_ids) + 1))[:args.prefill]

    rows = []
    plans = [("fp32 unfused, naive (host cache)", "fp32", False), ("fp32 unfused", "fp32", True),
             ("fp32 fused", "fp32-fused", True), ("fp16 unfused", "fp16", True), ("fp16 fused", "fp16-fused", True)]
    for label, name, device_cache in plans:
        if name not in paths:
            continue
        log(f"timing {label}")
        generator = Generator(paths[name], ep=args.ep, device_cache=device_cache)
        decoder = generator.decoder
        decoder.reset()
        prefill_diff = float(np.abs(decoder.forward(prompt_ids) - reference_prefill).max())
        decode_diff = float(np.abs(decoder.forward(reference_tokens[:4]) - reference_decode).max())
        runs = [greedy(generator, prompt_ids, args.tokens) for _ in range(args.repeats)]
        tokens = runs[0].token_ids
        agree = next((i for i, (a, b) in enumerate(zip(tokens, reference_tokens)) if a != b), len(tokens))
        prefill_ms = []
        for _ in range(args.repeats + 2):
            decoder.reset()
            started = time.perf_counter()
            decoder.forward(long_prompt)
            prefill_ms.append((time.perf_counter() - started) * 1e3)
        rows.append({"variant": label, "provider": generator.provider, "cache_on_device": device_cache,
                     "decoder": type(decoder).__name__, "max_abs_diff_prefill": prefill_diff,
                     "max_abs_diff_decode": decode_diff, "greedy_tokens_agreeing": agree,
                     f"prefill_{args.prefill}_ms": float(np.median(prefill_ms[2:])),
                     "decode_tokens_per_s": max(run.decode_tokens_per_s for run in runs)})

    pair = ("fp16-fused", "draft-fp16-fused") if "draft-fp16-fused" in paths else ("fp32-fused", "draft-fp32-fused")
    if all(name in paths for name in pair):
        rows.append(speculative_row(paths, pair, prompt_ids, reference_tokens, args))
    report(rows, errors, args, ort)


def speculative_row(paths, pair, prompt_ids, reference_tokens, args) -> dict:
    from graphopt.runtime import Generator
    from graphopt.runtime.speculative import SpeculativeGenerator

    log(f"speculative: target {pair[0]}, layer-truncated draft {pair[1]}")
    target = Generator(paths[pair[0]], ep=args.ep)
    plain = greedy(target, prompt_ids, args.tokens)
    speculative = SpeculativeGenerator(target, Generator(paths[pair[1]], ep=args.ep), gamma="auto")
    runs = [speculative.generate(prompt_ids, max_new_tokens=args.tokens, stop_on_eos=False) for _ in range(args.repeats)]
    best = max(runs, key=lambda run: run.decode_tokens_per_s)
    agree = next((i for i, (a, b) in enumerate(zip(best.token_ids, reference_tokens)) if a != b), len(best.token_ids))
    return {"variant": f"{pair[0].replace('-', ' ')} + speculative", "provider": target.provider,
            "cache_on_device": True, "decoder": "SpeculativeGenerator",
            "identical_to_plain_greedy": best.token_ids == plain.token_ids, "greedy_tokens_agreeing": agree,
            "acceptance_rate": best.extra.get("acceptance_rate"), "decode_tokens_per_s": best.decode_tokens_per_s}


def report(rows, errors, args, ort) -> None:
    import subprocess

    try:
        device = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        device = platform.processor()
    result = {"device": device, "onnxruntime": ort.__version__, "tokens": args.tokens, "rows": rows, "errors": errors}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    print(f"\ndevice: {device}; onnxruntime {ort.__version__}; {args.tokens} greedy tokens, batch 1; "
          f"CPU fp32 greedy as the token reference")
    print(f"{'variant':<36}{'decode tok/s':>13}{'prefill ms':>12}{'max|dlogit|':>13}{'greedy agree':>14}")
    for row in rows:
        prefill = row.get(f"prefill_{args.prefill}_ms")
        diff = row.get("max_abs_diff_prefill")
        print(f"{row['variant']:<36}{row['decode_tokens_per_s']:>13.1f}"
              f"{(f'{prefill:.1f}' if prefill is not None else '-'):>12}"
              f"{(f'{diff:.2e}' if diff is not None else '-'):>13}{row['greedy_tokens_agreeing']:>14}")
    for name, error in errors.items():
        print(f"not built: {name}: {error}")


if __name__ == "__main__":
    main()
