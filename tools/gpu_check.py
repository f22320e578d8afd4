"""GPU check for SmolLM2: export, fuse for CUDA, convert to fp16, verify CUDA against CPU, time it all.

Run on a machine with onnxruntime-gpu (see ../shared/device/README.md for a registry-less one):

    python tools/gpu_check.py --src PATH/SmolLM2-135M-Instruct.Q4_1.gguf --work /tmp/gpu-work [--out DIR]

Variants: fp32 and fp16, unfused and fused (``--target cuda``), with the KV cache on the host
(numpy feeds, the naive path), on the device (IOBinding, growing each step) or in static buffers
written in place (GroupQueryAttention's shared past/present), with and without CUDA graphs, and
fused with the q/k/v projections packed into one MatMul. Numerics: prefill and decode logits vs
the CPU fp32 model, and greedy tokens vs CPU fp32 greedy. Speed: 512-token prefill ms and 128-token
greedy decode tokens/s, plain and speculative (a layer-truncated fp16 fused draft), and
transformers' own ``generate`` on the same GPU. The table is printed last; ``--out`` gets JSON.
Also runs on CPU (``--ep cpu``) with any checkpoint, to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time
import traceback

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

    paths = {name: work / name for name in ("fp32", "fp32-fused", "fp16", "fp16-fused", "fp32-fused-packed",
                                            "fp16-fused-packed", "draft-fp32", "draft-fp32-fused",
                                            "draft-fp16-fused")}
    if not (skip_export and (paths["fp32"] / "model.onnx").is_file()):
        started = time.perf_counter()
        export(src, paths["fp32"], force=True)
        log(f"export + validation: {time.perf_counter() - started:.0f} s")
    steps = [
        ("fp32-fused", lambda: fuse(paths["fp32"], paths["fp32-fused"], "cuda", require=True, force=True)),
        ("fp16", lambda: convert(paths["fp32"], paths["fp16"], dtype="fp16", force=True)),
        ("fp16-fused", lambda: convert(paths["fp32-fused"], paths["fp16-fused"], dtype="fp16", force=True)),
        ("fp32-fused-packed", lambda: fuse(paths["fp32"], paths["fp32-fused-packed"], "cuda", require=True,
                                           force=True, pack_qkv=True)),
        ("fp16-fused-packed", lambda: convert(paths["fp32-fused-packed"], paths["fp16-fused-packed"], dtype="fp16",
                                              force=True)),
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


def agreeing_prefix(tokens: list[int], reference: list[int]) -> int:
    """How many leading tokens equal the reference's (greedy streams diverge for good at the first miss)."""
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(tokens))


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
    parser.add_argument("--plot", type=pathlib.Path, default=None, metavar="JSON",
                        help="only draw the PNG of an earlier run's gpu_check.json, beside it")
    args = parser.parse_args()
    if args.plot is not None:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return

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
    # (label, variant, cache, CUDA graphs)
    plans = [("fp32 unfused, naive (host cache)", "fp32", "host", False),
             ("fp32 unfused", "fp32", "device", False),
             ("fp32 fused", "fp32-fused", "device", False),
             ("fp16 unfused", "fp16", "device", False),
             ("fp16 fused", "fp16-fused", "device", False),
             ("fp16 fused, static cache", "fp16-fused", "static", False),
             ("fp16 fused, static + CUDA graph", "fp16-fused", "static", True),
             ("fp16 fused qkv, static + graph", "fp16-fused-packed", "static", True)]
    for label, name, cache, cuda_graph in plans:
        if name not in paths:
            continue
        log(f"timing {label}")
        try:
            rows.append(timed_row(label, paths[name], cache, cuda_graph, prompt_ids, reference_tokens,
                                  reference_prefill, reference_decode, long_prompt, args))
        except Exception as error:  # keep going: one failing variant must not hide the others
            errors[label] = f"{type(error).__name__}: {error}"
            log(f"FAILED {label}: {traceback.format_exc()}")

    pair = ("fp16-fused", "draft-fp16-fused") if "draft-fp16-fused" in paths else ("fp32-fused", "draft-fp32-fused")
    if all(name in paths for name in pair):
        try:
            rows.append(speculative_row(paths, pair, prompt_ids, reference_tokens, args))
        except Exception as error:
            errors["speculative"] = f"{type(error).__name__}: {error}"
            log(f"FAILED speculative: {errors['speculative']}")
    if args.ep == "cuda":
        try:
            rows += transformers_rows(args.src, prompt_ids, reference_tokens, args)
        except Exception as error:
            errors["transformers"] = f"{type(error).__name__}: {error}"
            log(f"FAILED transformers: {errors['transformers']}")
    report(rows, errors, args, ort)


def timed_row(label, path, cache, cuda_graph, prompt_ids, reference_tokens, reference_prefill, reference_decode,
              long_prompt, args) -> dict:
    import warnings

    from graphopt.runtime import Generator

    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generator = Generator(path, ep=args.ep, cache=cache, cuda_graph=cuda_graph)
    load_s = time.perf_counter() - started  # session, buffers and (CUDA graphs) the captured step
    for warning in caught:
        log(f"  warning: {warning.message}")
    decoder = generator.decoder
    decoder.reset()
    prefill_diff = float(np.abs(decoder.forward(prompt_ids) - reference_prefill).max())
    decode_diff = float(np.abs(decoder.forward(reference_tokens[:4]) - reference_decode).max())
    runs = [greedy(generator, prompt_ids, args.tokens) for _ in range(args.repeats)]
    tokens = runs[0].token_ids
    repeatable = all(run.token_ids == tokens for run in runs)
    agree = agreeing_prefix(tokens, reference_tokens)
    prefill_ms = []
    for _ in range(args.repeats + 2):
        decoder.reset()
        started = time.perf_counter()
        decoder.forward(long_prompt)
        prefill_ms.append((time.perf_counter() - started) * 1e3)
    return {"variant": label, "provider": generator.provider, "cache": cache,
            "cuda_graph": bool(getattr(decoder, "cuda_graph", False)), "decoder": type(decoder).__name__,
            "load_s": load_s, "max_abs_diff_prefill": prefill_diff, "max_abs_diff_decode": decode_diff,
            "greedy_tokens_agreeing": agree, "runs_identical": repeatable,
            f"prefill_{args.prefill}_ms": float(np.median(prefill_ms[2:])),
            "decode_tokens_per_s": max(run.decode_tokens_per_s for run in runs)}


def transformers_rows(src, prompt_ids, reference_tokens, args) -> list[dict]:
    """transformers' own eager ``generate`` on the same GPU, float32 and float16: what people would otherwise run.

    Prefill is timed as a one-token generate, decode as the rest of a ``--tokens`` generate.
    """
    import torch

    from graphopt.checkpoint import greedy_tokens, load

    model = load(src).model.to("cuda")
    ids = torch.tensor([prompt_ids], device="cuda")
    rows = []
    for dtype in (torch.float32, torch.float16):
        log(f"timing transformers generate, {dtype}")
        model.to(dtype)
        prefill, decode, tokens = [], [], []
        with torch.no_grad():
            for _ in range(args.repeats):
                torch.cuda.synchronize()
                started = time.perf_counter()
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
                torch.cuda.synchronize()
                prefill_s = time.perf_counter() - started
                started = time.perf_counter()
                tokens = greedy_tokens(model, prompt_ids, args.tokens)
                total_s = time.perf_counter() - started
                prefill.append(prefill_s * 1e3)
                decode.append((args.tokens - 1) / max(total_s - prefill_s, 1e-9))
        agree = agreeing_prefix(tokens, reference_tokens)
        rows.append({"variant": f"transformers generate, {str(dtype).removeprefix('torch.')}",
                     "provider": f"torch {torch.__version__} cuda", "greedy_tokens_agreeing": agree,
                     "prompt_prefill_ms": min(prefill), "decode_tokens_per_s": max(decode)})
    return rows


def speculative_row(paths, pair, prompt_ids, reference_tokens, args) -> dict:
    from graphopt.runtime import Generator
    from graphopt.runtime.speculative import SpeculativeGenerator

    log(f"speculative: target {pair[0]}, layer-truncated draft {pair[1]}")
    target = Generator(paths[pair[0]], ep=args.ep)
    plain = greedy(target, prompt_ids, args.tokens)
    speculative = SpeculativeGenerator(target, Generator(paths[pair[1]], ep=args.ep), gamma="auto")
    runs = [speculative.generate(prompt_ids, max_new_tokens=args.tokens, stop_on_eos=False) for _ in range(args.repeats)]
    best = max(runs, key=lambda run: run.decode_tokens_per_s)
    agree = agreeing_prefix(best.token_ids, reference_tokens)
    return {"variant": f"{pair[0].replace('-', ' ')} + speculative", "provider": target.provider,
            "cache": "auto", "decoder": "SpeculativeGenerator",
            "identical_to_plain_greedy": best.token_ids == plain.token_ids, "greedy_tokens_agreeing": agree,
            "acceptance_rate": best.extra.get("acceptance_rate"), "decode_tokens_per_s": best.decode_tokens_per_s}


def report(rows, errors, args, ort) -> None:
    import subprocess

    try:
        device = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        device = ""
    device = device or f"{platform.machine()} {platform.processor()}".strip()
    result = {"device": device, "onnxruntime": ort.__version__, "tokens": args.tokens, "prefill_tokens": args.prefill,
              "rows": rows, "errors": errors}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2))
        plot(result, args.out / "gpu_check.png")
    naive = next((row["decode_tokens_per_s"] for row in rows if row.get("cache") == "host"), None)
    print(f"\ndevice: {device}; onnxruntime {ort.__version__}; {args.tokens} greedy tokens, batch 1; "
          f"CPU fp32 greedy as the token reference")
    print(f"{'variant':<36}{'decode tok/s':>13}{'x naive':>9}{f'prefill {args.prefill} ms':>17}{'load s':>8}"
          f"{'max|dlogit|':>13}{'greedy agree':>14}")
    for row in rows:
        prefill = row.get(f"prefill_{args.prefill}_ms")
        diff = row.get("max_abs_diff_prefill")
        speedup = f"{row['decode_tokens_per_s'] / naive:.2f}" if naive else "-"
        load = f"{row['load_s']:.1f}" if "load_s" in row else "-"
        print(f"{row['variant']:<36}{row['decode_tokens_per_s']:>13.1f}{speedup:>9}"
              f"{(f'{prefill:.1f}' if prefill is not None else '-'):>17}{load:>8}"
              f"{(f'{diff:.2e}' if diff is not None else '-'):>13}{row['greedy_tokens_agreeing']:>14}")
    for name, error in errors.items():
        print(f"failed: {name}: {error}")


def plot(result: dict, path: pathlib.Path) -> None:
    """Decode tokens/s per variant as horizontal bars; skipped (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"no matplotlib here: plot later with python tools/gpu_check.py --plot {path.with_suffix('.json')}")
        return
    rows = result["rows"]
    figure, axis = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    axis.barh([row["variant"] for row in rows], [row["decode_tokens_per_s"] for row in rows], color="#4C72B0")
    axis.invert_yaxis()
    axis.set_xlabel("decode tokens/s (batch 1, greedy)")
    axis.set_title(f"SmolLM2-135M on {result['device']}, onnxruntime {result['onnxruntime']}", fontsize=10)
    for index, row in enumerate(rows):
        axis.text(row["decode_tokens_per_s"], index, f" {row['decode_tokens_per_s']:.0f}", va="center", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
