"""Where a decode token's time goes: ONNX Runtime's profiler, per operator type and per node group.

    python tools/profile_decode.py MODEL_DIR [MODEL_DIR ...] [--tokens 64] [--threads N] [--no-spinning]
        [--json OUT.json] [--png OUT.png]

For each model directory (fused with GroupQueryAttention, so the static KV cache is used, as
``graphopt generate`` does on the CPU):

1. a plain session decodes ``--tokens`` greedy tokens after a chat prompt: the real ms per token;
2. a profiling session (``SessionOptions.enable_profiling``) decodes the same tokens; its trace is
   split into runs (``model_run`` events) and each decode run's kernel events (``*_kernel_time``)
   are summed per operator type and per node group (q/k/v projections, o_proj, gate/up, down,
   LM head, attention, norms, SwiGLU elementwise, the rest). "between kernels" is a run's
   duration minus its kernels': scheduling, thread hand-off and the run's own set-up.

Profiling inflates short kernels (each event costs a clock read and a record), so the profiled ms
per token is larger than the plain one; the table shows the profiled split and, in the last
column, that split scaled to the plain ms per token. The first ``--skip`` decode runs are left
out (warm-up). Also printed: the session's intra-op thread count and spinning setting, and the
operators run per token after ONNX Runtime's graph optimizations.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import platform
import re
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import bench_cache  # noqa: E402  (its timed greedy loop)

PROMPT = "What is the capital of France? Answer in one sentence, then name two famous museums there."

# Node-group rules, first match wins: (group, regex on the node name, op types or None for any).
GROUPS = (
    ("LM head", re.compile(r"lm_head|/logits"), None),
    ("q/k/v projections", re.compile(r"(q|k|v|qkv)_proj"), None),
    ("o_proj", re.compile(r"o_proj"), None),
    ("gate/up projections", re.compile(r"(gate|up|gate_up)_proj"), None),
    ("down_proj", re.compile(r"down_proj"), None),
    ("attention (GQA)", None, {"GroupQueryAttention", "MultiHeadAttention", "Attention"}),
    ("norms", None, {"SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
                     "LayerNormalization", "RMSNormalization"}),
    ("SwiGLU elementwise", None, {"Sigmoid", "Mul", "QuickGelu", "Silu", "Swish"}),
    ("embedding", None, {"Gather", "GatherBlockQuantized"}),
)


def group_of(name: str, op_type: str) -> str:
    for group, pattern, op_types in GROUPS:
        if pattern is not None and pattern.search(name):
            return group
        if op_types is not None and op_type in op_types:
            return group
    return "other (mask, shapes)"


def prompt_ids(model_dir: pathlib.Path) -> list[int]:
    from graphopt.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer(model_dir)
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}]))


def decode(decoder, prompt: list[int], tokens: int) -> tuple[float, list[int]]:
    """Prefill (untimed), then ``tokens`` greedy steps (bench_cache's loop); seconds per step and the ids."""
    tokens_per_s, generated = bench_cache.decode(decoder, prompt, tokens)
    return 1.0 / tokens_per_s, generated


def session_options(threads: int | None, spinning: bool, profile_prefix: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


def parse_trace(path: str, skip: int) -> dict:
    """Per decode run: kernel microseconds per op type and per group, node counts, run duration."""
    events = json.loads(pathlib.Path(path).read_text())
    runs = sorted((event for event in events if event.get("name") == "model_run"), key=lambda event: event["ts"])
    kernels = sorted((event for event in events if event.get("cat") == "Node" and event["name"].endswith("_kernel_time")),
                     key=lambda event: event["ts"])
    # runs[0] is prefill; the decode runs follow. Assign each kernel to the run whose span holds it.
    per_run = []
    cursor = 0
    for run in runs:
        start, stop = run["ts"], run["ts"] + run["dur"]
        op_us: collections.Counter = collections.Counter()
        group_us: collections.Counter = collections.Counter()
        op_count: collections.Counter = collections.Counter()
        while cursor < len(kernels) and kernels[cursor]["ts"] < start:
            cursor += 1
        while cursor < len(kernels) and kernels[cursor]["ts"] <= stop:
            event = kernels[cursor]
            op_type = event["args"].get("op_name", "?")
            name = event["name"][: -len("_kernel_time")]
            op_us[op_type] += event["dur"]
            group_us[group_of(name, op_type)] += event["dur"]
            op_count[op_type] += 1
            cursor += 1
        per_run.append({"dur": run["dur"], "op_us": op_us, "group_us": group_us, "op_count": op_count})
    decode_runs = per_run[1 + skip:]
    if not decode_runs:
        raise SystemExit(f"{path}: no decode runs left after skipping {skip}")
    count = len(decode_runs)

    def mean(key: str) -> dict[str, float]:
        total: collections.Counter = collections.Counter()
        for run in decode_runs:
            total.update(run[key])
        return {name: value / count for name, value in total.items()}

    run_us = sum(run["dur"] for run in decode_runs) / count
    return {"runs": count, "run_us": run_us, "op_us": mean("op_us"), "group_us": mean("group_us"),
            "op_count": mean("op_count")}


def profile(model_dir: pathlib.Path, tokens: int, threads: int | None, spinning: bool, skip: int) -> dict:
    import onnxruntime as ort

    from graphopt.modeldir import ModelDir
    from graphopt.runtime.session import resolve_providers
    from graphopt.runtime.static_cache import StaticCacheDecoder

    model = ModelDir.open(model_dir)
    prompt = prompt_ids(model.path)
    providers = resolve_providers("cpu")
    plain = ort.InferenceSession(str(model.model_path), session_options(threads, spinning), providers=providers)
    decoder = StaticCacheDecoder(model.model_path, ep="cpu", session=plain)
    decode(decoder, prompt, 8)  # warm-up
    step_s, generated = decode(decoder, prompt, tokens)
    options = plain.get_session_options()
    settings = {"intra_op_num_threads": options.intra_op_num_threads or f"0 (ORT default: {os.cpu_count()} here)",
                "allow_spinning": spinning, "graph_optimization_level": str(options.graph_optimization_level)}
    del decoder, plain
    with tempfile.TemporaryDirectory() as scratch:
        session = ort.InferenceSession(str(model.model_path),
                                       session_options(threads, spinning, str(pathlib.Path(scratch) / "profile")),
                                       providers=providers)
        decoder = StaticCacheDecoder(model.model_path, ep="cpu", session=session)
        profiled_s, profiled_tokens = decode(decoder, prompt, tokens)
        trace = session.end_profiling()
        result = parse_trace(trace, skip)
    return {"model": str(model.path), "tokens": tokens, "ms_per_token": step_s * 1e3, "tokens_per_s": 1 / step_s,
            "profiled_ms_per_token": profiled_s * 1e3, "same_tokens_profiled": profiled_tokens == generated,
            "settings": settings, "prompt_tokens": len(prompt), **result}


def print_report(report: dict) -> None:
    run_us, plain_ms = report["run_us"], report["ms_per_token"]
    kernel_us = sum(report["op_us"].values())
    scale = plain_ms * 1e3 / (report["profiled_ms_per_token"] * 1e3) if report["profiled_ms_per_token"] else 1.0
    print(f"\n{report['model']}: {report['tokens_per_s']:.1f} tok/s plain ({plain_ms:.2f} ms/token), profiled "
          f"{report['profiled_ms_per_token']:.2f} ms/token over {report['runs']} decode runs; "
          f"{sum(report['op_count'].values()):.0f} operators per token; settings {report['settings']}")
    print(f"{'operator type':<34}{'per token':>10}{'us/token':>11}{'share':>8}{'us/op':>8}{'plain ms':>10}")
    rows = sorted(report["op_us"].items(), key=lambda item: -item[1])
    for op_type, microseconds in rows:
        count = report["op_count"][op_type]
        print(f"{op_type:<34}{count:>10.0f}{microseconds:>11.0f}{microseconds / run_us:>8.1%}"
              f"{microseconds / count:>8.1f}{microseconds * scale / 1e3:>10.3f}")
    between = run_us - kernel_us
    print(f"{'between kernels':<34}{'':>10}{between:>11.0f}{between / run_us:>8.1%}{'':>8}{between * scale / 1e3:>10.3f}")
    print(f"{'run (model_run)':<34}{'':>10}{run_us:>11.0f}{1:>8.0%}{'':>8}{run_us * scale / 1e3:>10.3f}")
    print(f"{'node group':<34}{'':>10}{'us/token':>11}{'share':>8}{'':>8}{'plain ms':>10}")
    for group, microseconds in sorted(report["group_us"].items(), key=lambda item: -item[1]):
        print(f"{group:<34}{'':>10}{microseconds:>11.0f}{microseconds / run_us:>8.1%}{'':>8}"
              f"{microseconds * scale / 1e3:>10.3f}")


def plot(reports: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({group for report in reports for group in report["group_us"]},
                    key=lambda group: -max(report["group_us"].get(group, 0) for report in reports))
    figure, axis = plt.subplots(figsize=(8, 1.2 + 0.7 * len(reports)))
    labels = [pathlib.Path(report["model"]).name for report in reports]
    for index, report in enumerate(reports):
        scale = report["ms_per_token"] / report["profiled_ms_per_token"]
        left = 0.0
        parts = [(group, report["group_us"].get(group, 0.0)) for group in groups]
        parts.append(("between kernels", report["run_us"] - sum(report["op_us"].values())))
        for color, (group, microseconds) in enumerate(parts):
            width = microseconds * scale / 1e3
            axis.barh(index, width, left=left, color=plt.cm.tab20(color % 20), label=group if index == 0 else None)
            left += width
    axis.set_yticks(range(len(reports)), labels)
    axis.set_xlabel("ms per decode token (profile split, scaled to the plain run)")
    axis.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(reports) < 3 else -0.2))
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dirs", type=pathlib.Path, nargs="+")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--skip", type=int, default=4, help="decode runs left out of the profile (warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ORT's choice)")
    parser.add_argument("--no-spinning", action="store_true")
    parser.add_argument("--json", type=pathlib.Path, default=None)
    parser.add_argument("--png", type=pathlib.Path, default=None)
    args = parser.parse_args()

    import onnxruntime

    reports = [profile(path, args.tokens, args.threads, not args.no_spinning, args.skip) for path in args.model_dirs]
    load = os.getloadavg()
    print(f"{platform.machine()} {os.cpu_count()} cores, onnxruntime {onnxruntime.__version__}, "
          f"load average {load[0]:.2f} {load[1]:.2f}")
    for report in reports:
        print_report(report)
    if args.json:
        args.json.write_text(json.dumps({"load_average": load, "onnxruntime": onnxruntime.__version__,
                                         "reports": reports}, indent=1) + "\n")
    if args.png:
        plot(reports, args.png)


if __name__ == "__main__":
    main()
