"""`graphopt inspect MODEL_DIR`: op histogram, parameters, size, inputs/outputs and lineage."""

from __future__ import annotations

import collections
import json

import click

from graphopt import interop
from graphopt.ir import parameter_count
from graphopt.modeldir import ModelDir


def summarize(model_dir: ModelDir) -> dict:
    """Facts about a model directory, read from its graph (without loading weights) and manifest."""
    import onnx

    model = onnx.load(str(model_dir.model_path), load_external_data=False)
    ops = collections.Counter(
        f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type for node in model.graph.node
    )

    def describe(values):
        return [{"name": value.name, "type": onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name,
                 "shape": [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]} for value in values]

    manifest = model_dir.manifest
    return {
        "path": str(model_dir.path),
        "family": manifest.family,
        "nodes": len(model.graph.node),
        "ops": dict(ops.most_common()),
        "parameters": parameter_count(model),
        "size_bytes": model_dir.size_bytes(),
        "opsets": {entry.domain or "ai.onnx": entry.version for entry in model.opset_import},
        "inputs": describe(model.graph.input),
        "outputs": describe(model.graph.output),
        "lineage": [step.to_json() for step in manifest.lineage],
        "runtimes": interop.runtimes_of(model_dir.path, manifest),
    }


@click.command("inspect")
@click.argument("model_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def command(model_dir: str, as_json: bool) -> None:
    """Show what is in MODEL_DIR."""
    summary = summarize(ModelDir.open(model_dir))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{summary['path']}  ({summary['family']}, {summary['nodes']} nodes, "
               f"{summary['parameters'] / 1e6:.1f}M parameters, {summary['size_bytes'] / 2**20:.1f} MiB)")
    click.echo("opsets: " + ", ".join(f"{domain} {version}" for domain, version in summary["opsets"].items()))
    click.echo("ops:")
    for op, count in summary["ops"].items():
        click.echo(f"  {op:<40} {count}")
    inputs, outputs = summary["inputs"], summary["outputs"]
    for label, values in (("inputs", inputs), ("outputs", outputs)):
        shown = values if len(values) <= 6 else values[:4] + [None] + values[-1:]
        click.echo(f"{label} ({len(values)}):")
        for value in shown:
            click.echo("  ..." if value is None else f"  {value['name']}: {value['type']} {value['shape']}")
    click.echo("runtimes:")
    for runtime, support in summary["runtimes"].items():
        verdict = "loads" if support["loads"] else "cannot load"
        click.echo(f"  {runtime:<18} {verdict}" + (f" ({support['reason']})" if support["reason"] else ""))
    click.echo("lineage:")
    for step in summary["lineage"]:
        figures = step.get("figures", {})
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(figures.items())[:6])
        click.echo(f"  {step['pass']}: {json.dumps(step.get('parameters', {}))}" + (f"  [{shown}]" if shown else ""))
