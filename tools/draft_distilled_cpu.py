"""Does a distilled draft make speculative decoding pay on this CPU? Build it, then measure.

    python tools/draft_distilled_cpu.py --target /work/models/smollm2 --work /tmp/dd --minutes 6 \
        [--also fused=/work/scratch-cpu/fused --also int8=DIR] --out tools/results/distill/draft-cpu.json

Builds the ``distilled`` draft recipe (a quarter of the layers of the float target, distilled from
it for ``--minutes``, int8), or takes ``--draft [NAME=]DIR`` (repeatable; e.g. one distilled on a GPU
and brought back with ``tools/distill_gpu.py land``), then over 128 greedy tokens of several chat
prompts, in interleaved rounds: plain decoding of each target, and speculative decoding of it with
each draft (``gamma`` auto; no fallback, so the draft is used at every step, unless ``--fallback``),
prompt by prompt, so that a machine whose speed drifts moves every row alike. Checks that the speculative output is identical
to the plain one, and prints a table (speed-up = speculative / plain tokens/s over all rounds, and
the lowest and highest per-round speed-up) with the load average.
"""

from __future__ import annotations

import argparse
import copy
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
    parser.add_argument("--draft", action="append", default=[], metavar="[NAME=]DIR",
                        help="measure this draft instead of building one (repeat to compare drafts)")
    parser.add_argument("--gamma", default="auto", help="draft tokens per verify: auto or a number")
    parser.add_argument("--fallback", action="store_true",
                        help="with the cost check that decodes plainly while speculation loses (what `graphopt "
                             "generate --draft` runs); by default the draft is used at every step")
    parser.add_argument("--skip-target", action="store_true", help="measure only the --also targets")
    parser.add_argument("--adaptive-too", action="store_true",
                        help="also measure each draft with gamma 'auto' as it was before the confidence rule "
                             "(adaptive gamma, no confidence stop): rows 'NAME/adaptive'")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    gamma = args.gamma if args.gamma == "auto" else int(args.gamma)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    work = pathlib.Path(args.work)
    named = [item.split("=", 1) if "=" in item else [pathlib.Path(item).name, item] for item in args.draft]
    drafts = {name: pathlib.Path(path) for name, path in named} or {"distilled": work / "draft-distilled"}
    for draft_dir in drafts.values() if args.draft else ():
        if not (draft_dir / "graphopt.json").is_file():
            raise SystemExit(f"error: {draft_dir} is not a graphopt model directory")
    started = time.perf_counter()
    if not args.draft and not (drafts["distilled"] / "graphopt.json").is_file():
        build_draft(args.target, drafts["distilled"], recipe="distilled", force=True, distill_minutes=args.minutes)
    build_seconds = time.perf_counter() - started
    report = {"drafts": {name: str(path) for name, path in drafts.items()}, "gamma": gamma, "fallback": args.fallback,
              "load_before": os.getloadavg(), "build_seconds": round(build_seconds, 1), "targets": {}}
    for name, draft_dir in drafts.items():
        distill_step = [step for step in json.loads((draft_dir / "graphopt.json").read_text())["lineage"]
                        if step.get("pass") == "distill"]
        if distill_step:
            figures = distill_step[-1]["figures"]
            report.setdefault("distill", {})[name] = {key: figures.get(key)
                                                      for key in ("tokens", "steps", "train_seconds", "final_loss")}
    targets = [] if args.skip_target else [("fp32", args.target)]
    for name, target in [*targets, *(item.split("=", 1) for item in args.also)]:
        plain = Generator(target, ep="cpu")
        speculative = {draft: SpeculativeGenerator(target, str(draft_dir), ep="cpu", fallback=args.fallback, gamma=gamma)
                       for draft, draft_dir in drafts.items()}
        if args.adaptive_too and gamma == "auto":
            for draft, generator in list(speculative.items()):
                # Same sessions, the other policy: the draft proposes up to the adaptive gamma, no confidence stop.
                adaptive = speculative[f"{draft}/adaptive"] = copy.copy(generator)
                adaptive.confident = False
                adaptive.policy, adaptive.cost_check = copy.deepcopy((generator.policy, generator.cost_check))
        prompts = [plain.encode_prompt(text, chat=True) for text in PROMPTS]
        rows = {draft: {"identical": True, "proposed": 0, "accepted": 0} for draft in speculative}
        rounds = {key: [] for key in ("plain", *speculative)}  # (tokens, seconds) per round
        for _ in range(args.rounds):
            counts = {key: [0, 0.0] for key in rounds}
            for prompt in prompts:  # interleaved: plain, then each draft, prompt by prompt
                reference = plain.generate(prompt, max_new_tokens=args.tokens, stop_on_eos=False)
                runs = {"plain": reference}
                for draft, generator in speculative.items():
                    runs[draft] = result = generator.generate(prompt, max_new_tokens=args.tokens, stop_on_eos=False)
                    rows[draft]["identical"] &= list(result.token_ids) == list(reference.token_ids)
                    rows[draft]["proposed"] += result.extra.get("draft_tokens_proposed", 0)
                    rows[draft]["accepted"] += result.extra.get("draft_tokens_accepted", 0)
                for key, run in runs.items():
                    counts[key][0] += len(run.token_ids) - 1
                    counts[key][1] += run.decode_s
            for key, count in counts.items():
                rounds[key].append(count)
        rate = {key: sum(n for n, _ in spans) / sum(s for _, s in spans) for key, spans in rounds.items()}
        for draft, row in rows.items():
            per_round = [(n / s) / (pn / ps) for (n, s), (pn, ps) in zip(rounds[draft], rounds["plain"])]
            report["targets"][f"{name} + {draft}"] = {
                "plain_tokens_per_s": round(rate["plain"], 2), "speculative_tokens_per_s": round(rate[draft], 2),
                "speedup": round(rate[draft] / rate["plain"], 3), "speedup_min": round(min(per_round), 3),
                "speedup_max": round(max(per_round), 3), "identical": row["identical"],
                "acceptance": round(row["accepted"] / row["proposed"], 3) if row["proposed"] else None,
                "load": os.getloadavg()}
    report["load_after"] = os.getloadavg()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\ndistilled: {report.get('distill')} (built in {report['build_seconds']} s)")
    print("| target + draft | plain tok/s | speculative tok/s | speed-up | per round | acceptance | identical | load (1/5/15 min) |")
    print("|---|---:|---:|---:|---|---:|---|---|")
    for name, row in report["targets"].items():
        load = "/".join(f"{value:.1f}" for value in row["load"])
        print(f"| {name} | {row['plain_tokens_per_s']} | {row['speculative_tokens_per_s']} | {row['speedup']} | "
              f"{row['speedup_min']}-{row['speedup_max']} | {row['acceptance']} | {row['identical']} | {load} |")


if __name__ == "__main__":
    main()
