"""Speculative decoding on CPU: plain vs speculative decode tokens/s, acceptance, and identity of output.

Runs greedy decoding of ``--max-new-tokens`` on a few prompts with the plain ONNX Runtime target,
then with each ``--draft LABEL=DIR`` (or ``LABEL=recipe:NAME``, built from the target on the fly),
and, with ``--hf``, transformers' own greedy and assisted generation (``assistant_model=``) on the
checkpoint with the same kinds of drafts built in torch. Prints a table and writes a PNG.

    python tools/bench_speculative.py --target SMOLLM2_DIR \
        --draft int4=recipe:int4 --draft half-int4=recipe:half-layers-int4 --hf

Re-run later with other targets and drafts (e.g. graphopt-quantized ones): any model directories
with the same tokenizer work.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time


PROMPTS = [
    ("Explain how a refrigerator works, step by step.", True),
    ("Write a short story about a robot who learns to paint.", True),
    ("What are the main causes of the French Revolution?", True),
    ("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", False),
    ("The history of the printing press begins", False),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="target model directory")
    parser.add_argument("--draft", action="append", default=[],
                        help="LABEL=DIR or LABEL=recipe:NAME (built into --work); repeatable")
    parser.add_argument("--gamma", default="auto", help="number or auto")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the built-in prompts")
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: all cores)")
    parser.add_argument("--no-fallback", action="store_true", help="speculate even when measured to lose")
    parser.add_argument("--hf", action="store_true", help="also run transformers greedy and assisted generation")
    parser.add_argument("--hf-source", default="smollm2-135m", help="checkpoint for graphopt.checkpoint.load")
    parser.add_argument("--hf-drafts", default="half-layers,int8",
                        help="torch assistants: half-layers (middle layers dropped like the ONNX recipe), int8 "
                             "(torch dynamic int8 Linear), full (the model itself)")
    parser.add_argument("--work", default="bench-out/speculative-drafts", help="where recipe drafts are built")
    parser.add_argument("--output", default="tools/bench_speculative", help="PNG and JSON path prefix")
    return parser.parse_args(argv)


def resolve_drafts(target: str, specs: list[str], work: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
    from graphopt.drafting import build_recipe
    from graphopt.modeldir import ModelDir

    drafts = []
    for spec in specs:
        label, _, location = spec.partition("=")
        if not location:
            label, location = pathlib.Path(spec).name, spec
        if location.startswith("recipe:"):
            recipe = location[len("recipe:"):]
            path = work / recipe
            if not (path / "graphopt.json").is_file():
                print(f"building draft {recipe} at {path}", file=sys.stderr)
                build_recipe(ModelDir.open(target), path, recipe, force=True)
            drafts.append((label, path))
        else:
            drafts.append((label, pathlib.Path(location)))
    return drafts


def ort_runner(generator, max_new_tokens: int):
    """A function prompt -> figures for one ONNX Runtime generator (warmed up here)."""
    generator.generate(generator.encode_prompt("Hello"), max_new_tokens=8)

    def run(text: str, chat: bool) -> dict:
        result = generator.generate(generator.encode_prompt(text, chat=chat), max_new_tokens=max_new_tokens,
                                    stop_on_eos=False)
        return {"decoded": len(result.token_ids) - 1, "seconds": result.decode_s, "token_ids": result.token_ids,
                **{key: result.extra.get(key, 0) for key in
                   ("draft_tokens_proposed", "draft_tokens_accepted", "target_calls", "plain_steps")}}

    return run


def hf_assistants(model, kinds: list[str]):
    import copy

    import torch

    assistants = {}
    for kind in kinds:
        if kind == "full":
            assistants[kind] = model
        elif kind == "half-layers":
            from graphopt.pruning import layers_to_drop

            assistant = copy.deepcopy(model)
            layers = assistant.config.num_hidden_layers
            dropped = layers_to_drop(layers, round(layers / 2), "ends")
            kept = [layer for index, layer in enumerate(assistant.model.layers) if index not in dropped]
            for index, layer in enumerate(kept):
                layer.self_attn.layer_idx = index
            assistant.model.layers = torch.nn.ModuleList(kept)
            assistant.config.num_hidden_layers = len(kept)
            if getattr(assistant.config, "layer_types", None):
                assistant.config.layer_types = assistant.config.layer_types[:len(kept)]
            assistants[kind] = assistant
        elif kind == "int8":
            assistant = copy.deepcopy(model)
            assistants[kind] = torch.ao.quantization.quantize_dynamic(assistant, {torch.nn.Linear}, dtype=torch.qint8)
        else:
            raise SystemExit(f"unknown --hf-drafts kind {kind!r}")
    return assistants


def hf_runner(model, tokenizer, max_new_tokens: int, assistant=None):
    """A function prompt -> figures for transformers' generate (plain, or assisted by ``assistant``)."""
    import torch

    def encode(text, chat):
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])

    options = dict(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                   pad_token_id=tokenizer.pad_token_id or 0)
    if assistant is not None:
        options["assistant_model"] = assistant
    with torch.no_grad():
        model.generate(encode("Hello", False), **{**options, "max_new_tokens": 8, "min_new_tokens": 8})

    def run(text: str, chat: bool) -> dict:
        ids = encode(text, chat)
        with torch.no_grad():
            started = time.perf_counter()
            model(ids)  # the prefill alone, subtracted below so that tokens/s is decode only
            prefill = time.perf_counter() - started
            started = time.perf_counter()
            output = model.generate(ids, **options)[0, ids.shape[1]:].tolist()
            seconds = time.perf_counter() - started - prefill
        return {"decoded": len(output) - 1, "seconds": seconds, "token_ids": output}

    return run


def identical(reference: list[list[int]], produced: list[list[int]]) -> str:
    same = sum(a == b for a, b in zip(reference, produced))
    return f"{same}/{len(reference)}"


def main(argv=None) -> None:
    args = parse_args(argv)
    from graphopt.runtime import Generator
    from graphopt.runtime.speculative import SpeculativeGenerator

    prompts = PROMPTS[:args.prompts]
    gamma = args.gamma if args.gamma == "auto" else int(args.gamma)
    work = pathlib.Path(args.work)
    drafts = resolve_drafts(args.target, args.draft, work)
    load = os.getloadavg()[0]
    # Every configuration runs each prompt in turn, so load changes on a shared machine hit all alike.
    target = Generator(args.target, threads=args.threads)
    runners = [("ORT plain", ort_runner(target, args.max_new_tokens))]
    for label, path in drafts:
        # Its own target session: a speculating pair spins only within runs (spinning="run", see make_session).
        generator = SpeculativeGenerator(args.target, path, gamma=gamma, threads=args.threads,
                                         draft_threads=args.threads, fallback=not args.no_fallback)
        runners.append((f"ORT + {label}", ort_runner(generator, args.max_new_tokens)))
    if args.hf:
        import torch

        from graphopt import checkpoint

        if args.threads:
            torch.set_num_threads(args.threads)
        loaded = checkpoint.load(args.hf_source)
        model, tokenizer = loaded.model.eval(), loaded.tokenizer
        runners.append(("HF plain", hf_runner(model, tokenizer, args.max_new_tokens)))
        for kind, assistant in hf_assistants(model, [k for k in args.hf_drafts.split(",") if k]).items():
            runners.append((f"HF assisted + {kind}", hf_runner(model, tokenizer, args.max_new_tokens, assistant)))
    totals = {label: [] for label, _ in runners}
    for text, chat in prompts:
        for label, run in runners:
            totals[label].append(run(text, chat))
            figures = totals[label][-1]
            print(f"{label}: {figures['decoded'] / figures['seconds']:.1f} tokens/s", file=sys.stderr)
    rows = []
    for label, results in totals.items():
        decoded, seconds = sum(r["decoded"] for r in results), sum(r["seconds"] for r in results)
        row = {"config": label, "decode_tokens_per_s": decoded / seconds,
               "token_ids": [r["token_ids"] for r in results]}
        proposed = sum(r.get("draft_tokens_proposed", 0) for r in results)
        if proposed:
            row["acceptance_rate"] = sum(r["draft_tokens_accepted"] for r in results) / proposed
            row["tokens_per_target_call"] = decoded / sum(r["target_calls"] for r in results)
            row["plain_steps"] = sum(r["plain_steps"] for r in results)
        rows.append(row)

    reference = rows[0]["token_ids"]
    base = rows[0]["decode_tokens_per_s"]
    print(f"\ntarget {args.target}, {len(prompts)} prompts x {args.max_new_tokens} new tokens, greedy, "
          f"gamma {args.gamma}, "
          f"threads {args.threads or 'all'}, {os.cpu_count()} cores, load average at start {load:.1f}, "
          f"at end {os.getloadavg()[0]:.1f}")
    header = (f"{'config':28} {'decode tok/s':>12} {'speedup':>8} {'accept':>7} {'tok/call':>8} {'plain steps':>11} "
              f"{'same as ORT plain':>18}")
    print(header)
    print("-" * len(header))
    for row in rows:
        accept = f"{row['acceptance_rate']:.2f}" if "acceptance_rate" in row else "-"
        per_call = f"{row['tokens_per_target_call']:.2f}" if "tokens_per_target_call" in row else "-"
        plain_steps = str(row.get("plain_steps", "-"))
        print(f"{row['config']:28} {row['decode_tokens_per_s']:12.1f} {row['decode_tokens_per_s'] / base:7.2f}x "
              f"{accept:>7} {per_call:>8} {plain_steps:>11} {identical(reference, row['token_ids']):>18}")

    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    record = {"target": args.target, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
              "load_average": load, "rows": [{key: value for key, value in row.items() if key != "token_ids"}
                                             | {"identical": identical(reference, row["token_ids"])} for row in rows]}
    output.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no PNG written", file=sys.stderr)
        return
    figure, axis = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    labels = [row["config"] for row in rows][::-1]
    speeds = [row["decode_tokens_per_s"] for row in rows][::-1]
    colors = ["tab:gray" if "plain" in label else ("tab:orange" if label.startswith("HF") else "tab:blue")
              for label in labels]
    axis.barh(labels, speeds, color=colors)
    for index, row in enumerate(rows[::-1]):
        note = f"{row['decode_tokens_per_s']:.1f}"
        if "acceptance_rate" in row:
            note += f"  (accept {row['acceptance_rate']:.2f}, {row['tokens_per_target_call']:.2f} tok/call)"
        axis.text(row["decode_tokens_per_s"], index, " " + note, va="center", fontsize=8)
    axis.set_xlabel("greedy decode tokens/s (prefill excluded)")
    axis.set_title(f"Speculative decoding on CPU: {pathlib.Path(args.target).name}, "
                   f"{len(prompts)} prompts x {args.max_new_tokens} tokens")
    axis.set_xlim(0, max(speeds) * 1.6)
    figure.tight_layout()
    figure.savefig(output.with_suffix(".png"), dpi=120)
    print(f"wrote {output.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
