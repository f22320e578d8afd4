"""Convert a graphopt model directory to ONNX Runtime's ORT format, for mobile and edge runtimes.

    python tools/to_ort_format.py MODEL_DIR -o OUT [--optimization basic|extended|all] [--force]

OUT is a new directory with ``model.ort`` (one flatbuffer file, weights inside: the ORT format has no
external data), the tokenizer files and ``graphopt.json`` with ``"model_file": "model.ort"`` and one
more lineage step. ORT Mobile / minimal builds load only this format; the full onnxruntime package
loads it too (``InferenceSession("model.ort")``), which is how the conversion is checked here: the
ORT-format model must give the same logits as the source on a prefill and a decode step.

Uses ONNX Runtime's own converter (``onnxruntime.tools.convert_onnx_models_to_ort``, "Fixed"
optimization style: graph optimizations applied now, at the level chosen; ``basic`` keeps the
model portable across CPUs, ``all`` adds layout-specific fusions). A model over 2 GB does not fit
the format.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile

import numpy as np

ORT_MODEL_FILE = "model.ort"


def convert(model_dir: pathlib.Path, output: pathlib.Path, optimization: str = "basic", force: bool = False) -> pathlib.Path:
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, _convert

    from graphopt.manifest import LineageStep
    from graphopt.modeldir import MODEL_FILE, ModelDir, atomic_output, derive

    source = ModelDir.open(model_dir)
    with atomic_output(output, force=force) as scratch, tempfile.TemporaryDirectory(dir=scratch.parent) as work:
        # The converter converts every .onnx file of a directory: give it the model alone.
        staging = pathlib.Path(work) / "model"
        staging.mkdir()
        for file in source.path.iterdir():
            if file.name == MODEL_FILE or file.name.startswith(MODEL_FILE + ".data"):
                (staging / file.name).symlink_to(file.resolve())
        converted = _convert(staging / MODEL_FILE, pathlib.Path(work) / "ort", optimization, OptimizationStyle.Fixed,
                             custom_op_library=None, create_optimized_onnx_model=False,
                             allow_conversion_failures=False, target_platform=None,
                             session_options_config_entries={})
        shutil.move(str(converted[0]), scratch / ORT_MODEL_FILE)
        step = LineageStep("to_ort_format", {"optimization": optimization, "style": "Fixed"},
                           figures=check_logits(source.model_path, scratch / ORT_MODEL_FILE, source.manifest.vocab_size))
        derive(source, scratch, step, model_file=ORT_MODEL_FILE)
    return output


def check_logits(reference: pathlib.Path, converted: pathlib.Path, vocab_size: int) -> dict:
    from graphopt.runtime.decoder import Decoder

    ids = np.random.default_rng(0).integers(0, vocab_size, size=9).tolist()
    logits = []
    for path in (reference, converted):
        decoder = Decoder(path)
        logits.append(np.concatenate([decoder.forward(ids[:8]), decoder.forward(ids[8:])]))
    difference = float(np.abs(logits[0] - logits[1]).max())
    if difference > 1e-3:
        raise SystemExit(f"error: the ORT-format model's logits differ from the source's by {difference:.3g}")
    return {"max_abs_logits_diff": difference}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=pathlib.Path)
    parser.add_argument("-o", "--output", type=pathlib.Path, required=True)
    parser.add_argument("--optimization", choices=("basic", "extended", "all"), default="basic")
    parser.add_argument("--force", action="store_true")
    arguments = parser.parse_args(argv)
    from graphopt.errors import GraphoptError

    try:
        output = convert(arguments.model_dir, arguments.output, arguments.optimization, arguments.force)
    except GraphoptError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    manifest = json.loads((output / "graphopt.json").read_text())
    size = (output / ORT_MODEL_FILE).stat().st_size
    print(f"{output / ORT_MODEL_FILE}: {size / 1e6:.1f} MB, max |logits diff| "
          f"{manifest['lineage'][-1]['figures']['max_abs_logits_diff']:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
