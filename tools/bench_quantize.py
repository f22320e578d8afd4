"""Benchmark quantization on SmolLM2: perplexity, size on disk and decode speed, graphopt vs ONNX Runtime's quantizers.

    python tools/bench_quantize.py --model SMOLLM2_DIR [--work bench-out/quantize]

Perplexity: ``graphopt.evaluate`` on graphopt/data/eval-gpl3.txt (the GPL-3 license text, real
English), windows of 512 tokens. Decode: 128 greedy tokens with ``graphopt.runtime.Generator``
from a short prompt, tokens/s of the decode loop, best of ``--repeats`` rounds interleaved over the
variants (the machine is shared: interleaving spreads load changes over all of them). Size: the
model directory on disk.

Variants: fp32; graphopt W8A8 (QDQ), int8 weight-only and int4 (block 32 and 128, RTN and GPTQ);
peers on the same machine: onnxruntime.quantization ``quantize_static`` (QDQ, MinMax, per-channel,
symmetric int8 activations, same calibration sequences), ``quantize_dynamic`` (int8, per-channel),
and onnxruntime-genai 0.18's model builder (``-p int4 -e cpu``, run beforehand on the dequantized
checkpoint, given with ``--genai``; without it, ``MatMulNBitsQuantizer`` int4 block 32 stands in). Prints a table, writes a JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import time

import numpy as np

from graphopt.calibration import CalibrationSpec, calibration_sequences
from graphopt.evaluate import DEFAULT_TEXT, evaluate
from graphopt.modeldir import ModelDir
from graphopt.quantization import QuantizeConfig, quantize

PROMPT = "The history of the printing press begins"

GRAPHOPT_VARIANTS = {
    "graphopt W8A8": dict(weights="int8", activations="int8", smooth=0.5, calibration="mse"),
    "graphopt W8A8 auto 3%": dict(weights="int8", activations="int8", smooth=0.5, calibration="mse",
                                  max_ppl_increase=3.0),
    "graphopt int8 weight-only": dict(weights="int8", activations="none", block_size=128),
    "graphopt int4 b32 rtn": dict(weights="int4", activations="none", block_size=32, method="rtn"),
    "graphopt int4 b32 gptq": dict(weights="int4", activations="none", block_size=32, method="gptq"),
    "graphopt int4 b128 rtn": dict(weights="int4", activations="none", block_size=128, method="rtn"),
    "graphopt int4 b128 gptq": dict(weights="int4", activations="none", block_size=128, method="gptq"),
}


def directory_size(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def peer_directory(source: ModelDir, target: pathlib.Path, write) -> pathlib.Path:
    """A model directory for a peer quantizer: its model.onnx, the source's tokenizer and manifest."""
    if (target / "model.onnx").exists():
        return target
    scratch = target.with_name(target.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    write(scratch / "model.onnx")
    for file in source.tokenizer_files():
        shutil.copy2(file, scratch / file.name)
    shutil.copy2(source.manifest_path, scratch / "graphopt.json")
    os.rename(scratch, target)
    return target


def ort_static(source: ModelDir, sequences):
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    from graphopt.capture import empty_cache_feeds
    from graphopt.runtime.session import make_session

    cache = empty_cache_feeds(make_session(source.model_path, optimization="disable"))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"input_ids": np.asarray([ids], dtype=np.int64),
                                "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
                                "position_ids": np.arange(len(ids), dtype=np.int64)[None], **cache} for ids in sequences])

        def get_next(self):
            return next(self.feeds, None)

    def write(path):
        quantize_static(str(source.model_path), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True,
                        extra_options={"ActivationSymmetric": True})
    return write


def ort_dynamic(source: ModelDir):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def write(path):
        quantize_dynamic(str(source.model_path), str(path), per_channel=True, weight_type=QuantType.QInt8,
                         use_external_data_format=True)
    return write


def ort_nbits(source: ModelDir, block_size: int = 32):
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    def write(path):
        model = onnx.load(str(source.model_path))
        config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=4)
        quantizer = MatMulNBitsQuantizer(model, algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(path), use_external_data_format=True)
    return write


def genai_builder(source: ModelDir, built: pathlib.Path):
    """onnxruntime-genai's model builder output (``-p int4 -e cpu``), made to fit graphopt's decoder contract.

    The builder's graph has no ``position_ids`` input (GroupQueryAttention derives positions from
    ``attention_mask``) and a symbolic cache head dimension; an unused ``position_ids`` input and
    the static head dimension are added, nothing else changes.
    """
    import onnx

    def write(path):
        model = onnx.load(str(built / "model.onnx"), load_external_data=False)
        head_dim = source.manifest.head_dim
        for value in [*model.graph.input, *model.graph.output]:
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param == "kv_cache_dim":
                    dim.Clear()
                    dim.dim_value = head_dim
        if not any(value.name == "position_ids" for value in model.graph.input):
            model.graph.input.append(onnx.helper.make_tensor_value_info("position_ids", onnx.TensorProto.INT64,
                                                                        ["batch_size", "sequence_length"]))
        onnx.save(model, str(path))
        shutil.copy2(built / "model.onnx.data", path.parent / "model.onnx.data")
    return write


def decode_speed(model_dir: pathlib.Path, tokens: int) -> float:
    from graphopt.runtime import Generator

    generator = Generator(model_dir)
    prompt = generator.encode_prompt(PROMPT)
    generator.generate(prompt, max_new_tokens=8, stop_on_eos=False)  # warm-up
    return generator.generate(prompt, max_new_tokens=tokens, stop_on_eos=False).decode_tokens_per_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="exported float32 model directory")
    parser.add_argument("--work", default="bench-out/quantize")
    parser.add_argument("--windows", type=int, default=None, help="Perplexity windows (default: the whole text).")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="Substrings of variant names to run.")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--static-samples", type=int, default=16, help="Calibration sequences for quantize_static.")
    parser.add_argument("--agreement", action="store_true", help="Also greedy agreement / KL against fp32 (2x the time).")
    parser.add_argument("--unfused", action="store_true", help="Quantize the plain export instead of the fused one.")
    parser.add_argument("--genai", default=None,
                        help="Output folder of onnxruntime-genai's builder (-p int4 -e cpu) to compare with.")
    arguments = parser.parse_args()

    source = original = ModelDir.open(arguments.model)
    work = pathlib.Path(arguments.work)
    work.mkdir(parents=True, exist_ok=True)
    # The data-free calibration sequences (16 x 128 tokens sampled from the fp32 model, seed 0), sampled
    # once and shared by every variant that calibrates, graphopt's and the peers'.
    calibration_file = work / "calibration-self-generated.npz"
    if not calibration_file.exists():
        np.savez(calibration_file, input_ids=np.asarray(calibration_sequences(original.path, CalibrationSpec())))
    calibration = CalibrationSpec(npz=str(calibration_file))
    variants: dict[str, pathlib.Path] = {"fp32": source.path}
    if not arguments.unfused:
        # The recommended order: fuse (GroupQueryAttention, SkipSimplifiedLayerNormalization), then quantize.
        from graphopt.fusion import fuse

        fused = work / "fp32-fused"
        if not (fused / "model.onnx").exists():
            fuse(source.path, fused, "cpu")
        variants["fp32 fused"] = fused
        source = ModelDir.open(fused)
    timings: dict[str, float] = {}
    for name, options in GRAPHOPT_VARIANTS.items():
        if arguments.only and not any(part in name for part in arguments.only):
            continue
        target = work / (name.replace(" ", "-") + ("-unfused" if arguments.unfused else ""))
        if not (target / "model.onnx").exists():
            started = time.perf_counter()
            quantize(source.path, target, QuantizeConfig(calib=calibration, **options))
            timings[name] = time.perf_counter() - started
        variants[name] = target
    if not arguments.no_peers:
        sequences = None
        # Peers quantize the plain export, as a user of onnxruntime.quantization would.
        peers = {"ort quantize_static (QDQ, MinMax)": lambda: ort_static(original, sequences),
                 "ort quantize_dynamic (int8)": lambda: ort_dynamic(original),
                 "ort MatMulNBits int4 b32": lambda: ort_nbits(original, 32)}
        for name, make in peers.items():
            if arguments.only and not any(part in name for part in arguments.only):
                continue
            target = work / (name.split(" (")[0].replace(" ", "-") + ("-unfused" if arguments.unfused else ""))
            if "static" in name and not (target / "model.onnx").exists():
                sequences = np.load(calibration_file)["input_ids"].tolist()[:arguments.static_samples]
            try:
                started = time.perf_counter()
                if name.startswith("ort MatMulNBits") and arguments.genai:
                    continue
                variants[name] = peer_directory(original, target, make())
                timings.setdefault(name, time.perf_counter() - started)
            except Exception as error:  # a peer failing is a result to report, not a reason to stop
                print(f"{name}: failed: {error}", file=sys.stderr)

    if arguments.genai and not arguments.no_peers:
        variants["onnxruntime-genai builder int4"] = peer_directory(original, work / "genai-builder-int4",
                                                                     genai_builder(original, pathlib.Path(arguments.genai)))
    results = {name: {"size_mib": directory_size(path) / 2**20} for name, path in variants.items()}
    for name, path in variants.items():
        reference = variants["fp32"] if arguments.agreement and name != "fp32" else None
        quality = evaluate(path, DEFAULT_TEXT, window=512, max_windows=arguments.windows, reference_dir=reference)
        results[name].update(perplexity=quality.perplexity, tokens=quality.tokens,
                             agreement=quality.token_agreement, mean_kl=quality.mean_kl)
        print(f"  {name}: perplexity {quality.perplexity:.3f}", file=sys.stderr)
    for round_index in range(arguments.repeats):
        for name, path in variants.items():
            speed = decode_speed(path, arguments.tokens)
            results[name].setdefault("decode_runs", []).append(round(speed, 2))
        print(f"  round {round_index + 1}: load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    base = results["fp32"]
    print(f"\nSmolLM2-135M, CPU ({os.cpu_count()} cores, shared; load average {os.getloadavg()[0]:.2f}); perplexity on "
          f"{DEFAULT_TEXT.name}, window 512, {base['tokens']} tokens; decode {arguments.tokens} greedy tokens, best of "
          f"{arguments.repeats}")
    header = f"{'variant':36s} {'ppl':>8s} {'Δppl':>7s} {'agree':>6s} {'MiB':>7s} {'tok/s':>7s} {'×fp32':>6s}  runs"
    print(header)
    print("-" * len(header))
    for name, row in results.items():
        row["decode_tokens_per_s"] = max(row["decode_runs"])
        row["speedup"] = row["decode_tokens_per_s"] / max(base["decode_runs"])
        row["ppl_increase_percent"] = 100 * (row["perplexity"] / base["perplexity"] - 1)
        agree = f"{100 * row['agreement']:.1f}" if row.get("agreement") is not None else "-"
        print(f"{name:36s} {row['perplexity']:8.3f} {row['ppl_increase_percent']:+6.1f}% {agree:>6s} "
              f"{row['size_mib']:7.1f} {row['decode_tokens_per_s']:7.1f} {row['speedup']:6.2f}  {row['decode_runs']}")
    (work / "results.json").write_text(json.dumps({"results": results, "quantize_seconds": timings}, indent=2))
    plot(results, work / "bench_quantize.png")
    print(f"\nwrote {work / 'results.json'} and {work / 'bench_quantize.png'}")
    return 0


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5.5))
    for name, row in results.items():
        color = "black" if name == "fp32" else "tab:blue" if name.startswith("graphopt") else "tab:red"
        axes.scatter(row["decode_tokens_per_s"], row["perplexity"], color=color, s=20 + row["size_mib"] / 4)
        axes.annotate(name, (row["decode_tokens_per_s"], row["perplexity"]), fontsize=7, xytext=(4, 3),
                      textcoords="offset points")
    axes.set_xlabel("decode tokens/s (128 greedy tokens, CPU)")
    axes.set_ylabel("perplexity (eval-gpl3.txt, window 512)")
    axes.set_yscale("log")
    axes.set_title("SmolLM2-135M quantization: graphopt (blue) vs onnxruntime.quantization (red)\n"
                   "marker area ~ size on disk")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
