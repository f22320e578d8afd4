"""GPU check for SmolLM2: export, fuse for CUDA, convert to fp16, verify CUDA against CPU, time it all.

Run on a machine with onnxruntime-gpu (see ../shared/device/README.md for a registry-less one):

    python tools/gpu_check.py --src PATH/SmolLM2-135M-Instruct.Q4_1.gguf --work /tmp/gpu-work [--out DIR]

Variants: fp32 and fp16, unfused and fused (``--target cuda``), with the KV cache on the host
(numpy feeds, the naive path), on the device (IOBinding, growing each step) or in static buffers
written in place (GroupQueryAttention's shared past/present), with and without CUDA graphs, and
fused with the q/k/v projections packed into one MatMul (and that graph with an on-device ArgMax
output, passes/greedy_head.py; with GroupQueryAttention's flash kernel switched off; quantized
weight-only to int8 / int4 MatMulNBits with float16 scales). Numerics: prefill and decode logits vs
the CPU fp32 model, and greedy tokens vs CPU fp32 greedy. Speed: 512-token prefill ms and 128-token
greedy decode tokens/s, plain and speculative (a layer-truncated fp16 fused draft; ungraphed
verify as before, and with the verify forward over gamma + 1 tokens and the draft's catch-up
captured as CUDA graphs too), batched decode through the continuous-batching engine (aggregate
tokens/s at batch 1, 8, 32), and the peers of tools/gpu_peers.py in the same process on the same
card: transformers' eager ``generate``, its static cache + torch.compile (fp16, bf16) and
onnxruntime-genai's CUDA build on its own builder's fp16 and int4 models. ``--stages`` picks parts
(the device allows 10 minutes a command: transformers' compile runs best in a second call, its
JSON joined with ``--merge``; ``--brief`` keeps the static-cache + CUDA-graph rows; stage ``profile``
lists a decode step's CUDA kernels and splits the graphed step's wall time into its host parts).
The table is printed last; ``--out`` gets JSON and a PNG. Also runs
on CPU (``--ep cpu``) with any checkpoint, to check the script itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import platform
import sys
import time
import traceback

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

PROMPT = "Write a short paragraph about the history of Paris."


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


class _LogHandler:
    """Routes tools/gpu_peers.py's logger through :func:`log`."""

    @staticmethod
    def install() -> None:
        import logging

        class Handler(logging.Handler):
            def emit(self, record):
                log(record.getMessage())

        peers = logging.getLogger("gpu_check")
        peers.setLevel(logging.INFO)
        peers.addHandler(Handler())


def build_variants(src: str, work: pathlib.Path, skip_export: bool, errors: dict[str, str],
                   draft: pathlib.Path | None = None) -> dict[str, pathlib.Path]:
    """Build every variant that can be built; a failed one is logged in ``errors`` and left out.

    The draft is the half-layer cut of the export unless ``draft`` names a float32 model directory
    (e.g. a distilled draft), which then takes the target's fusion and precision the same way.
    """
    from graphopt.drafting import build_draft
    from graphopt.export import export
    from graphopt.fusion import fuse
    from graphopt.convert import convert

    paths = {name: work / name for name in ("fp32", "fp32-fused", "fp16", "fp16-fused", "fp32-fused-packed",
                                            "fp16-fused-packed", "draft-fp32", "draft-fp32-fused",
                                            "draft-fp16-fused", "draft-fp32-fused-packed", "draft-fp16-fused-packed",
                                            "fp16-fused-packed-argmax", "int8-fused-packed", "int4-fused-packed",
                                            "fp16-int8-packed", "fp16-int4-packed", "fp16-int8-packed-argmax",
                                            "fp16-int4-packed-argmax", "fp32-fused-packed-gu", "fp16-fused-packed-gu",
                                            "fp16-fused-packed-gu-argmax")}
    if draft is not None:
        paths["draft-fp32"] = draft
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
        ("draft-fp32", lambda: build_draft(paths["fp32"], paths["draft-fp32"], recipe="half-layers", force=True)
         if draft is None else None),
        ("draft-fp32-fused", lambda: fuse(paths["draft-fp32"], paths["draft-fp32-fused"], "cuda", require=True,
                                          force=True)),
        ("draft-fp16-fused", lambda: convert(paths["draft-fp32-fused"], paths["draft-fp16-fused"], dtype="fp16",
                                             force=True)),
        # The packed fp16 graph plus an on-device ArgMax output (passes/greedy_head.py).
        ("fp16-fused-packed-argmax", lambda: _with_greedy_head(paths["fp16-fused-packed"],
                                                               paths["fp16-fused-packed-argmax"])),
        # q/k/v and gate/up packed (graphopt fuse --pack-qkv --pack-gate-up): one GEMM fewer per layer, a Split more.
        ("fp32-fused-packed-gu", lambda: fuse(paths["fp32"], paths["fp32-fused-packed-gu"], "cuda", require=True,
                                              force=True, pack_qkv=True, pack_gate_up=True)),
        ("fp16-fused-packed-gu", lambda: convert(paths["fp32-fused-packed-gu"], paths["fp16-fused-packed-gu"],
                                                 dtype="fp16", force=True)),
        ("fp16-fused-packed-gu-argmax", lambda: _with_greedy_head(paths["fp16-fused-packed-gu"],
                                                                  paths["fp16-fused-packed-gu-argmax"])),
        ("draft-fp32-fused-packed", lambda: fuse(paths["draft-fp32"], paths["draft-fp32-fused-packed"], "cuda",
                                                 require=True, force=True, pack_qkv=True)),
        ("draft-fp16-fused-packed", lambda: convert(paths["draft-fp32-fused-packed"], paths["draft-fp16-fused-packed"],
                                                    dtype="fp16", force=True)),
    ]
    for bits in ("int8", "int4"):
        steps += _weight_only_steps(paths, bits)
    for name, build in steps:
        try:
            build()
        except Exception as error:  # keep going: report every variant that does build
            errors[name] = f"{type(error).__name__}: {error}"
            log(f"FAILED to build {name}: {errors[name]}")
    return {name: path for name, path in paths.items() if (path / "model.onnx").is_file()}


def _weight_only_steps(paths: dict[str, pathlib.Path], bits: str) -> list:
    """The packed fp32 graph quantized weight-only (RTN MatMulNBits, one kernel a linear as onnxruntime-genai's
    int4; the LM head too), then float16 (the CUDA kernels' scale type), then the on-device ArgMax."""
    from graphopt.convert import convert
    from graphopt.quantization import QuantizeConfig, quantize

    config = QuantizeConfig(weights=bits, activations="none", method="rtn", head=bits)
    quantized, half, greedy = (paths[f"{bits}-fused-packed"], paths[f"fp16-{bits}-packed"],
                               paths[f"fp16-{bits}-packed-argmax"])
    return [(quantized.name, lambda: quantize(paths["fp32-fused-packed"], quantized, config, force=True)),
            # convert's own check compares with the float32 int8-activation CPU kernels: the GPU rows say it.
            (half.name, lambda: convert(quantized, half, dtype="fp16", force=True, validate=False)),
            (greedy.name, lambda: _with_greedy_head(half, greedy))]


def _with_greedy_head(source: pathlib.Path, output: pathlib.Path) -> None:
    import shutil

    from graphopt.passes.greedy_head import write_with_greedy_head

    shutil.rmtree(output, ignore_errors=True)
    write_with_greedy_head(source, output)


def agreeing_prefix(tokens: list[int], reference: list[int]) -> int:
    """How many leading tokens equal the reference's (greedy streams diverge for good at the first miss)."""
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(tokens))


def greedy(generator, prompt_ids: list[int], tokens: int):
    return generator.generate(prompt_ids, max_new_tokens=tokens, stop_on_eos=False)


STAGES = ("graphopt", "genai", "transformers", "profile")


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
    parser.add_argument("--draft", type=pathlib.Path, default=None,
                        help="a float32 draft model directory (e.g. distilled) instead of the half-layer cut")
    parser.add_argument("--brief", action="store_true",
                        help="batch-1 rows of static cache + CUDA graph only (the rest as measured before), "
                             "speculative with gamma auto only")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated parts to run, of {', '.join(STAGES)} (default: all)")
    parser.add_argument("--plot", type=pathlib.Path, default=None, metavar="JSON",
                        help="only draw the PNG of an earlier run's gpu_check.json, beside it")
    parser.add_argument("--merge", type=pathlib.Path, nargs="+", default=None, metavar="JSON",
                        help="only join the rows of several runs' gpu_check.json (in order) into --out")
    args = parser.parse_args()
    if args.plot is not None:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return
    if args.merge is not None:
        merge(args.merge, args.out)
        return
    stages = [stage for stage in args.stages.split(",") if stage]
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown:
        sys.exit(f"error: unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}")
    _LogHandler.install()

    import onnxruntime as ort

    log(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}, python {platform.python_version()}")
    if args.ep == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        sys.exit("CUDAExecutionProvider is not available in this onnxruntime")
    args.work.mkdir(parents=True, exist_ok=True)
    errors: dict[str, str] = {}
    rows: list[dict] = []
    genai_build = None
    reference_file = args.work / "reference.json"
    if "graphopt" in stages or not reference_file.is_file():
        paths = build_variants(args.src, args.work, args.skip_export, errors, args.draft)
        if "genai" in stages:
            genai_build = start_genai_build(args.src, args.work, errors)
        from graphopt.runtime import Generator

        reference = Generator(paths["fp32"], ep="cpu")
        prompt_ids = reference.encode_prompt(PROMPT, chat=True)
        reference_tokens = greedy(reference, prompt_ids, args.tokens).token_ids
        reference_file.write_text(json.dumps({"prompt_ids": prompt_ids, "tokens": reference_tokens}))
    else:
        paths = {}
        saved = json.loads(reference_file.read_text())
        prompt_ids, reference_tokens = saved["prompt_ids"], saved["tokens"]
        if "genai" in stages:
            genai_build = start_genai_build(args.src, args.work, errors)
    if "graphopt" in stages:
        rows += graphopt_rows(paths, reference, prompt_ids, reference_tokens, errors, args)
    if "genai" in stages and genai_build is not None:
        code = genai_build.wait()
        log(f"onnxruntime-genai builder exited with {code}")
        try:
            from gpu_peers import genai_rows

            rows += genai_rows(args.work, prompt_ids, reference_tokens, args.tokens, args.repeats)
        except Exception as error:
            errors["onnxruntime-genai"] = f"{type(error).__name__}: {error}"
            log(f"FAILED onnxruntime-genai: {traceback.format_exc()}")
    # Last: the profiler (CUPTI) stays attached to the process.
    for label, name in (("fp16 qkv + argmax", "fp16-fused-packed-argmax"),
                        ("fp16 qkv + gate/up + argmax", "fp16-fused-packed-gu-argmax")):
        if "profile" not in stages or name not in paths:
            continue
        try:
            rows += profile_rows(paths[name], prompt_ids, args, label=label)
        except Exception as error:
            errors[f"profile {label}"] = f"{type(error).__name__}: {error}"
            log(f"FAILED profile {label}: {traceback.format_exc()}")
    if "transformers" in stages and args.ep == "cuda":
        try:
            rows += transformers_rows(args.src, prompt_ids, reference_tokens, args)
        except Exception as error:
            errors["transformers"] = f"{type(error).__name__}: {error}"
            log(f"FAILED transformers: {traceback.format_exc()}")
    report(rows, errors, args, ort)


def start_genai_build(src: str, work: pathlib.Path, errors: dict[str, str]):
    """Save the checkpoint as a Hugging Face directory and start onnxruntime-genai's builder on it (background)."""
    try:
        import onnxruntime_genai  # noqa: F401

        from gpu_peers import build_genai_models
    except ImportError as error:
        errors["onnxruntime-genai"] = f"not importable here: {error}"
        log(errors["onnxruntime-genai"])
        return None
    hf_dir = work / "hf"
    if not (hf_dir / "config.json").is_file():
        from graphopt.checkpoint import load

        checkpoint = load(src)
        # A GGUF loads dequantized to float32, but transformers keeps its GGUF quantizer and then
        # refuses to save; the weights saved are the float32 ones graphopt exported.
        checkpoint.model.hf_quantizer = None
        checkpoint.model.save_pretrained(hf_dir)
        checkpoint.tokenizer.save_pretrained(hf_dir)
    log("onnxruntime-genai builder started (fp16 and int4, CUDA) in the background")
    return build_genai_models(hf_dir, work)


def graphopt_rows(paths, reference, prompt_ids, reference_tokens, errors, args) -> list[dict]:
    """Every graphopt variant at batch 1, speculative (ungraphed and graphed verify), and batched decode."""
    reference.decoder.reset()
    reference_prefill = reference.decoder.forward(prompt_ids)
    reference_decode = reference.decoder.forward(reference_tokens[:4])
    long_prompt = (prompt_ids * (args.prefill // len(prompt_ids) + 1))[:args.prefill]

    rows = []
    # (label, variant, cache, CUDA graphs[, environment for the session])
    graphed = [("fp16 fused, static + CUDA graph", "fp16-fused", "static", True),
               ("fp16 fused qkv, static + graph", "fp16-fused-packed", "static", True),
               ("fp16 fused qkv + device argmax, static + graph", "fp16-fused-packed-argmax", "static", True),
               # GroupQueryAttention's memory-efficient kernel instead of flash attention (read at session start).
               ("fp16 qkv + argmax, no flash attention, static + graph", "fp16-fused-packed-argmax", "static", True,
                {"ORT_DISABLE_FLASH_ATTENTION": "1"}),
               ("fp16 fused qkv + gate/up + device argmax, static + graph", "fp16-fused-packed-gu-argmax", "static",
                True),
               ("int8 weight-only (RTN) fp16 qkv + argmax, static + graph", "fp16-int8-packed-argmax", "static", True),
               ("int4 weight-only (RTN) fp16 qkv + argmax, static + graph", "fp16-int4-packed-argmax", "static", True)]
    plans = graphed if args.brief else [
             ("fp32 unfused, naive (host cache)", "fp32", "host", False),
             ("fp32 unfused", "fp32", "device", False),
             ("fp32 fused", "fp32-fused", "device", False),
             ("fp16 unfused", "fp16", "device", False),
             ("fp16 fused", "fp16-fused", "device", False),
             ("fp16 fused, static cache", "fp16-fused", "static", False),
             *graphed]
    for label, name, cache, cuda_graph, *environment in plans:
        if name not in paths:
            continue
        log(f"timing {label}")
        try:
            with _environment(*environment):
                rows.append(timed_row(label, paths[name], cache, cuda_graph, prompt_ids, reference_tokens,
                                      reference_prefill, reference_decode, long_prompt, args))
        except Exception as error:  # keep going: one failing variant must not hide the others
            errors[label] = f"{type(error).__name__}: {error}"
            log(f"FAILED {label}: {traceback.format_exc()}")

    pair = ("fp16-fused", "draft-fp16-fused") if "draft-fp16-fused" in paths else ("fp32-fused", "draft-fp32-fused")
    if all(name in paths for name in pair) and not args.brief:
        try:
            rows.append(speculative_row(paths, pair, prompt_ids, reference_tokens, args))
        except Exception as error:
            errors["speculative"] = f"{type(error).__name__}: {error}"
            log(f"FAILED speculative: {errors['speculative']}")
    if all(name in paths for name in ("fp16-fused-packed", "draft-fp16-fused-packed")):
        try:
            rows += graphed_speculative_rows(paths["fp16-fused-packed"], paths["draft-fp16-fused-packed"], prompt_ids,
                                             reference_tokens, args)
        except Exception as error:
            errors["speculative, graphed verify"] = f"{type(error).__name__}: {error}"
            log(f"FAILED speculative, graphed verify: {traceback.format_exc()}")
    batched = "fp16-fused-packed" if args.ep == "cuda" else "fp32-fused"
    if batched in paths:
        try:
            rows += batched_rows(paths[batched], prompt_ids, reference_tokens, args)
        except Exception as error:
            errors["batched"] = f"{type(error).__name__}: {error}"
            log(f"FAILED batched: {traceback.format_exc()}")
    return rows


@contextlib.contextmanager
def _environment(variables: dict[str, str] | None = None):
    """Environment variables set while a session is made (ONNX Runtime's kernels read theirs then)."""
    saved = {name: os.environ.get(name) for name in variables or {}}
    os.environ.update(variables or {})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def profile_rows(path, prompt_ids, args, steps: int = 32, label: str = "fp16 qkv + argmax") -> list[dict]:
    """Where a decode step's time goes: CUDA kernels per step (CUPTI, through torch.profiler, which records
    every kernel of the process, ONNX Runtime's too) on the eager static-cache step, then the graphed
    step's wall time split into its host parts (three input copies, the run, the 8-byte token read)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from graphopt.runtime import Generator

    generator = Generator(path, ep=args.ep, cache="static", cuda_graph=False)
    decoder = generator.decoder
    decoder.reset()
    decoder.forward_greedy(prompt_ids)
    for _ in range(8):
        decoder.forward_greedy([1])
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        decoder.forward_greedy([1])
    eager_ms = (time.perf_counter() - started) * 1e3 / steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decoder.forward_greedy([1])
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(event.name, []).append(event.time_range.elapsed_us())
    table = sorted(((name, len(times) / steps, sum(times) / steps) for name, times in kernels.items()),
                   key=lambda item: -item[2])
    per_step_us = sum(item[2] for item in table)
    log(f"profile {label} (eager static step, {steps} steps): {sum(item[1] for item in table):.0f} kernels and copies a "
        f"step, {per_step_us:.0f} us of device time, {eager_ms * 1e3:.0f} us wall")
    for name, count, micros in table[:30]:
        log(f"  {micros:8.1f} us  {count:6.1f}x  {name[:110]}")
    del generator

    # The graphed step, split into its host parts.
    generator = Generator(path, ep=args.ep, cache="static", cuda_graph=True)
    decoder = generator.decoder
    decoder.reset()
    decoder.reserve(len(prompt_ids) + steps * 4 + 1)
    decoder.forward_greedy(prompt_ids)
    fixed = decoder._bindings[1]
    parts = {"ids copy": 0.0, "positions copy": 0.0, "mask copy": 0.0, "run (graph replay)": 0.0, "token read": 0.0}
    ids = np.ones((1, 1), dtype=np.int64)
    for step in range(steps * 4):
        start = decoder._length
        decoder._mask[0, start] = 1
        marks = [time.perf_counter()]
        if fixed["tokens"] is not fixed["ids"]:  # a greedy-head step finds its token in place (static_cache)
            fixed["ids"].update_inplace(ids)
        marks.append(time.perf_counter())
        if decoder._feeds_positions:  # as the decoder's own step: not for a graph that reads none
            fixed["positions"].update_inplace(np.full((1, 1), start, dtype=np.int64))
        marks.append(time.perf_counter())
        decoder._step_mask.update_inplace(decoder._mask)
        marks.append(time.perf_counter())
        decoder.session.run_with_iobinding(fixed["binding"], fixed["options"])
        marks.append(time.perf_counter())
        fixed["tokens"].numpy()
        marks.append(time.perf_counter())
        decoder._length += 1
        if step >= 8:
            for name, before, after in zip(parts, marks, marks[1:]):
                parts[name] += (after - before) * 1e6
    counted = steps * 4 - 8
    split = {name: micros / counted for name, micros in parts.items()}
    log("graphed step, us: " + ", ".join(f"{name} {micros:.1f}" for name, micros in split.items())
        + f"; total {sum(split.values()):.1f}")
    return [{"variant": f"profile: {label}, eager static step", "profile": True, "steps": steps,
             "eager_step_us": eager_ms * 1e3, "device_us_per_step": per_step_us,
             "kernels_per_step": sum(item[1] for item in table),
             "kernels": [{"name": name, "per_step": count, "us_per_step": micros} for name, count, micros in table],
             "graphed_step_us": split}]


def graphed_speculative_rows(target_path, draft_path, prompt_ids, reference_tokens, args) -> list[dict]:
    """Speculative decoding with the target's verify and the draft's catch-up as CUDA graphs, per gamma.

    Plain decoding of the same target (its one-token graph) is timed here too, so the ratio is
    within one stretch of the run. Fixed gammas run without the fallback (the raw speed of
    speculation); ``auto`` adapts gamma and falls back to plain decoding when that is faster.
    """
    from graphopt.runtime import Generator
    from graphopt.runtime.speculative import SpeculativeGenerator

    plain_generator = Generator(target_path, ep=args.ep)
    plain_runs = [greedy(plain_generator, prompt_ids, args.tokens) for _ in range(args.repeats)]
    plain = max(run.decode_tokens_per_s for run in plain_runs)
    plain_tokens = plain_runs[0].token_ids
    del plain_generator
    rows = []
    for gamma in ("auto",) if args.brief else (1, 2, 3, 4, "auto"):
        label = f"fp16 qkv + speculative, graphed verify, gamma {gamma}"
        log(f"timing {label}")
        speculative = SpeculativeGenerator(target_path, draft_path, gamma=gamma, ep=args.ep, cache="static",
                                           fallback=gamma == "auto")
        log(f"  target graphs for {speculative.target.decoder.graphed_lengths} tokens, draft for "
            f"{speculative.draft.decoder.graphed_lengths}")
        runs = [speculative.generate(prompt_ids, max_new_tokens=args.tokens, stop_on_eos=False)
                for _ in range(args.repeats)]
        best = max(runs, key=lambda run: run.decode_tokens_per_s)
        rows.append({"variant": label, "provider": speculative.provider, "decoder": "SpeculativeGenerator",
                     "gamma": gamma, "graphed_target_lengths": speculative.target.decoder.graphed_lengths,
                     "identical_to_plain_greedy": all(run.token_ids == plain_tokens for run in runs),
                     "greedy_tokens_agreeing": agreeing_prefix(best.token_ids, reference_tokens),
                     "acceptance_rate": best.extra.get("acceptance_rate"),
                     "tokens_per_target_call": best.extra.get("tokens_per_target_call"),
                     "plain_steps": best.extra.get("plain_steps"),
                     "decode_tokens_per_s": best.decode_tokens_per_s, "plain_decode_tokens_per_s": plain,
                     "x_plain": best.decode_tokens_per_s / plain})
        del speculative
    return rows


def batched_rows(path, prompt_ids, reference_tokens, args) -> list[dict]:
    """The continuous-batching engine: ``b`` copies of the prompt decoded together, aggregate tokens/s.

    Wall time from submit to the last token, prefills included (each request's prefill runs alone,
    between decode steps); the engine's own decode-only rate is reported beside it.
    """
    from graphopt.runtime.batching import BatchEngine, BatchRequest

    request = BatchRequest(tuple(prompt_ids), max_new_tokens=args.tokens, stop_on_eos=False)
    rows = []
    for cuda_graph in (True, False):
        engine = BatchEngine(path, ep=args.ep, max_batch=32, context=len(prompt_ids) + args.tokens + 8,
                             cuda_graph=cuda_graph)
        rows += _engine_rows(engine, request, reference_tokens, "graphed step" if cuda_graph else "eager steps")
        del engine
    return rows


def _engine_rows(engine, request, reference_tokens, how: str) -> list[dict]:
    rows = []
    for batch in (1, 8, 32):
        log(f"timing batching engine ({how}), batch {batch}")
        engine.generate([request] * batch)  # warm-up: the shapes of this batch
        best = None
        for _ in range(2):
            engine.stats.decode_s = engine.stats.decode_tokens = engine.stats.prefill_s = 0
            engine.stats.prefill_chunks = 0
            started = time.perf_counter()
            sequences = engine.generate([request] * batch)
            seconds = time.perf_counter() - started
            produced = sum(len(sequence.token_ids) for sequence in sequences)
            figures = (produced / seconds, engine.stats.decode_tokens / max(engine.stats.decode_s, 1e-9), sequences,
                       engine.stats.prefill_s, engine.stats.prefill_chunks, seconds)
            best = figures if best is None or figures[0] > best[0] else best
        log(f"  {best[0]:.0f} tokens/s: {best[5] * 1e3:.0f} ms, prefill {best[3] * 1e3:.1f} ms in {best[4]} runs")
        agree = min(agreeing_prefix(sequence.token_ids, reference_tokens) for sequence in best[2])
        rows.append({"variant": f"graphopt batching engine fp16 qkv, {how}, batch {batch}", "provider": engine.provider,
                     "batch": batch, "greedy_tokens_agreeing": agree, "aggregate_tokens_per_s": best[0],
                     "decode_only_tokens_per_s": best[1], "includes_prefill": True,
                     "prefill_ms": best[3] * 1e3, "prefill_runs": best[4], "wall_ms": best[5] * 1e3})
    return rows


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
    """transformers on the same GPU: eager ``generate`` (fp32, fp16), then the peers of tools/gpu_peers.py.

    Eager prefill is timed as a one-token generate, decode as the rest of a ``--tokens`` generate.
    """
    import torch

    from gpu_peers import transformers_rows as static_rows
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
                     "provider": f"torch {torch.__version__} cuda", "peer": True, "greedy_tokens_agreeing": agree,
                     "prompt_prefill_ms": min(prefill), "decode_tokens_per_s": max(decode)})
    return rows + static_rows(model, prompt_ids, reference_tokens, args.tokens, args.repeats)


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


KEPT_TOKENS = 120  # of 128 greedy tokens equal to the CPU fp32 model's (fp16 may flip a late near-tie)


def summarize(rows: list[dict], tokens: int = 128) -> dict:
    """The issue's figures: best graphopt and best peer at batch 1, their ratio, speculative vs plain, batch 32.

    Batch-1 rows count only with greedy tokens equal to the CPU fp32 model's for at least
    ``KEPT_TOKENS`` of 128 (scaled to ``tokens``; the issue's bar: a fast variant that answers
    differently is not a win).
    """
    single = [row for row in rows if "decode_tokens_per_s" in row and not row.get("batch")
              and row.get("greedy_tokens_agreeing", 0) >= KEPT_TOKENS * tokens / 128]
    ours = [row for row in single if not row.get("peer") and row.get("decoder") != "SpeculativeGenerator"]
    peers = [row for row in single if row.get("peer")]
    summary: dict = {}
    if ours:
        best = max(ours, key=lambda row: row["decode_tokens_per_s"])
        summary["graphopt_best"] = {key: best[key] for key in ("variant", "decode_tokens_per_s", "greedy_tokens_agreeing")}
    if peers:
        best_peer = max(peers, key=lambda row: row["decode_tokens_per_s"])
        summary["peer_best"] = {key: best_peer[key] for key in ("variant", "decode_tokens_per_s", "greedy_tokens_agreeing")}
    if ours and peers:
        summary["graphopt_over_best_peer"] = summary["graphopt_best"]["decode_tokens_per_s"] / \
            summary["peer_best"]["decode_tokens_per_s"]
    graphed = [row for row in rows if "x_plain" in row]
    if graphed:
        best = max(graphed, key=lambda row: row["x_plain"])
        summary["speculative_best"] = {key: best.get(key) for key in ("variant", "decode_tokens_per_s", "x_plain",
                                                                      "identical_to_plain_greedy", "acceptance_rate")}
    summary["batch_32"] = {row["variant"]: row["aggregate_tokens_per_s"] for row in rows if row.get("batch") == 32
                           and "aggregate_tokens_per_s" in row}
    return summary


def report(rows, errors, args, ort) -> None:
    import subprocess

    try:
        device = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        device = ""
    device = device or f"{platform.machine()} {platform.processor()}".strip()
    result = {"device": device, "onnxruntime": ort.__version__, "tokens": args.tokens, "prefill_tokens": args.prefill,
              "stages": args.stages, "rows": rows, "errors": errors, "summary": summarize(rows, args.tokens)}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2))
        plot(result, args.out / "gpu_check.png")
    print_table(result)


def print_table(result: dict) -> None:
    rows, prefill_key = result["rows"], f"prefill_{result['prefill_tokens']}_ms"
    naive = next((row["decode_tokens_per_s"] for row in rows if row.get("cache") == "host"), None)
    print(f"\ndevice: {result['device']}; onnxruntime {result['onnxruntime']}; {result['tokens']} greedy tokens; "
          f"CPU fp32 greedy as the token reference")
    print(f"{'variant (batch 1)':<58}{'decode tok/s':>13}{'x naive':>9}{'prefill ms':>11}{'load s':>8}"
          f"{'max|dlogit|':>13}{'greedy agree':>14}")
    for row in rows:
        if "decode_tokens_per_s" not in row or row.get("batch"):
            continue
        prefill = row.get(prefill_key)
        diff = row.get("max_abs_diff_prefill")
        speedup = f"{row['decode_tokens_per_s'] / naive:.2f}" if naive else "-"
        load = f"{row['load_s']:.1f}" if "load_s" in row else "-"
        print(f"{row['variant']:<58}{row['decode_tokens_per_s']:>13.1f}{speedup:>9}"
              f"{(f'{prefill:.1f}' if prefill is not None else '-'):>11}{load:>8}"
              f"{(f'{diff:.2e}' if diff is not None else '-'):>13}{row['greedy_tokens_agreeing']:>14}")
    batched = [row for row in rows if row.get("batch")]
    if batched:
        print(f"\n{'batched (aggregate, prefill included)':<58}{'batch':>6}{'tokens/s':>10}{'greedy agree':>14}")
        for row in batched:
            if "aggregate_tokens_per_s" in row:
                print(f"{row['variant']:<58}{row['batch']:>6}{row['aggregate_tokens_per_s']:>10.0f}"
                      f"{row['greedy_tokens_agreeing']:>14}")
    for row in rows:
        if "error" in row:
            print(f"failed: {row['variant']}: {row['error'].splitlines()[0] if row['error'] else ''}")
    for name, error in result["errors"].items():
        print(f"failed: {name}: {error}")
    print("summary:", json.dumps(result.get("summary", {}), indent=1))


def merge(paths: list[pathlib.Path], out: pathlib.Path | None) -> None:
    """Join several runs' rows and errors (same device and settings) into one gpu_check.json and PNG."""
    parts = [json.loads(path.read_text()) for path in paths]
    result = dict(parts[0])
    result["rows"] = [row for part in parts for row in part["rows"]]
    result["errors"] = {name: error for part in parts for name, error in part["errors"].items()}
    result["stages"] = ",".join(part.get("stages", "") for part in parts)
    result["merged_from"] = [str(path) for path in paths]
    result["summary"] = summarize(result["rows"], result.get("tokens", 128))
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
        plot(result, out / "gpu_check.png")
    print_table(result)


def plot(result: dict, path: pathlib.Path) -> None:
    """Decode tokens/s per variant as horizontal bars; skipped (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"no matplotlib here: plot later with python tools/gpu_check.py --plot {path.with_suffix('.json')}")
        return
    rows = [row for row in result["rows"] if "decode_tokens_per_s" in row and not row.get("batch")]
    colors = ["#DD8452" if row.get("peer") else "#4C72B0" for row in rows]
    figure, axis = plt.subplots(figsize=(9, 0.4 * len(rows) + 1.4))
    axis.barh([row["variant"] for row in rows], [row["decode_tokens_per_s"] for row in rows], color=colors)
    axis.invert_yaxis()
    axis.tick_params(axis="y", labelsize=7)
    axis.set_xlabel("decode tokens/s (batch 1, 128 greedy tokens); orange: other runtimes")
    axis.set_title(f"SmolLM2-135M on {result['device']}, onnxruntime {result['onnxruntime']}", fontsize=10)
    for index, row in enumerate(rows):
        axis.text(row["decode_tokens_per_s"], index, f" {row['decode_tokens_per_s']:.0f}", va="center", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
