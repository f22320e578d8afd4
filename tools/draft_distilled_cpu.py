"""Does a distilled draft make speculative decoding pay on this CPU? Build it, then measure.

    python tools/draft_distilled_cpu.py --target /work/models/smollm2 --work /tmp/dd --minutes 6 \
        [--also fused=/work/scratch-cpu/fused --also int8=DIR] --out tools/results/distill/draft-cpu.json

Builds the ``distilled`` draft recipe (a quarter of the layers of the float target, distilled from
it for ``--minutes``, int8), or takes ``--draft DIR`` (e.g. one distilled on a GPU and brought back
with ``tools/distill_gpu.py land``), then over 128 greedy tokens of several chat prompts, in interleaved
rounds: plain decoding of each target, and speculative decoding of it with the draft (``gamma``
auto, no fallback so the draft is really used). Checks that the speculative output is identical
to the plain one, and prints a table (speed-up = speculative / plain tokens/s) with the load average.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

PROMPTS = (
    "What is the capital of France?",
    "Explain how a refrigerator works, step by step.",
    "Write a short story about a robot who learns to paint.",
)


def main() -> None:
    from graphopt.drafting import build_draft
    from graphopt.runtime import Generator
    from graphopt.runtime.speculative import SpeculativeGenerator

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="float, unfused target (the distillation teacher)")
    parser.add_argument("--also", action="append", default=[], metavar="NAME=DIR",
                        help="also measure these forms of the target (e.g. fused=DIR, int8=DIR)")
    parser.add_argument("--work", required=True)
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--draft", default=None, help="measure this draft instead of building one")
    parser.add_argument("--gamma", default="auto", help="draft tokens per verify: auto or a number")
    parser.add_argument("--skip-target", action="store_true", help="measure only the --also targets")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    gamma = args.gamma if args.gamma == "auto" else int(args.gamma)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    work = pathlib.Path(args.work)
    draft_dir = pathlib.Path(args.draft) if args.draft else work / "draft-distilled"
    if args.draft and not (draft_dir / "graphopt.json").is_file():
        raise SystemExit(f"error: {draft_dir} is not a graphopt model directory")
    started = time.perf_counter()
    if not (draft_dir / "graphopt.json").is_file():
        build_draft(args.target, draft_dir, recipe="distilled", force=True, distill_minutes=args.minutes)
    build_seconds = time.perf_counter() - started
    report = {"draft": str(draft_dir), "gamma": gamma, "load_before": os.getloadavg(),
              "build_seconds": round(build_seconds, 1), "targets": {}}
    distill_step = [step for step in json.loads((draft_dir / "graphopt.json").read_text())["lineage"]
                    if step.get("pass") == "distill"]
    if distill_step:
        figures = distill_step[-1]["figures"]
        report["distill"] = {key: figures.get(key) for key in ("tokens", "steps", "train_seconds", "final_loss")}
    targets = [] if args.skip_target else [("fp32", args.target)]
    for name, target in [*targets, *(item.split("=", 1) for item in args.also)]:
        plain = Generator(target, ep="cpu")
        speculative = SpeculativeGenerator(target, str(draft_dir), ep="cpu", fallback=False, gamma=gamma)
        prompts = [plain.encode_prompt(text, chat=True) for text in PROMPTS]
        totals = {"plain": [0, 0.0], "speculative": [0, 0.0]}
        identical, proposed, accepted = True, 0, 0
        for _ in range(args.rounds):
            for prompt in prompts:  # interleaved: plain, then speculative, prompt by prompt
                reference = plain.generate(prompt, max_new_tokens=args.tokens, stop_on_eos=False)
                result = speculative.generate(prompt, max_new_tokens=args.tokens, stop_on_eos=False)
                identical &= list(result.token_ids) == list(reference.token_ids)
                for key, run in (("plain", reference), ("speculative", result)):
                    totals[key][0] += len(run.token_ids) - 1
                    totals[key][1] += run.decode_s
                proposed += result.extra.get("draft_tokens_proposed", 0)
                accepted += result.extra.get("draft_tokens_accepted", 0)
        plain_rate = totals["plain"][0] / totals["plain"][1]
        spec_rate = totals["speculative"][0] / totals["speculative"][1]
        report["targets"][name] = {"plain_tokens_per_s": round(plain_rate, 2), "speculative_tokens_per_s": round(spec_rate, 2),
                                   "speedup": round(spec_rate / plain_rate, 3), "identical": identical,
                                   "acceptance": round(accepted / proposed, 3) if proposed else None,
                                   "load": os.getloadavg()}
    report["load_after"] = os.getloadavg()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\ndistilled draft: {report.get('distill')} (built in {report['build_seconds']} s)")
    print("| target | plain tok/s | speculative tok/s | speed-up | acceptance | identical | load (1/5/15 min) |")
    print("|---|---:|---:|---:|---:|---|---|")
    for name, row in report["targets"].items():
        load = "/".join(f"{value:.1f}" for value in row["load"])
        print(f"| {name} | {row['plain_tokens_per_s']} | {row['speculative_tokens_per_s']} | {row['speedup']} | "
              f"{row['acceptance']} | {row['identical']} | {load} |")


if __name__ == "__main__":
    main()
