"""How well does a draft's own confidence predict the target's greedy token, and which stopping rule pays?

    python tools/draft_confidence.py --target FUSED --draft DRAFT [--tokens 128] \
        [--draft-ms 2.6 --verify-slope-ms 0.8 --plain-ms 20] --out tools/results/distill/draft-confidence.json

The target answers six chat prompts greedily; the draft then reads each answer once (teacher
forced) and, at every position, its top token and that token's probability are recorded against
the target's token. Printed: agreement per confidence bin. Then the recorded positions are
replayed in order under stopping rules (fixed gamma 1-7; stop once the product of the draft's top
probabilities falls below a threshold), with the given costs of a draft step, a verify slot and a
plain target step, and the modelled speed-up over plain decoding is printed per rule. A replay is
exact for greedy decoding: while every proposal is accepted, the draft's context is the target's.
It models time, it does not measure it (``tools/draft_distilled_cpu.py`` measures).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

PROMPTS = (
    "What is the capital of France?",
    "Explain how a refrigerator works, step by step.",
    "Write a short story about a robot who learns to paint.",
    "List five fruits and their colors.",
    "How does a bicycle stay upright?",
    "Write a haiku about autumn leaves.",
)
BINS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01)


def record(target_dir: str, draft_dir: str, tokens: int) -> list[np.ndarray]:
    """Per prompt: ``[positions, 2]`` of (draft's top probability, 1 if its top token is the target's)."""
    from graphopt.runtime import Generator

    target, draft = Generator(target_dir), Generator(draft_dir)
    answers = []
    for text in PROMPTS:
        ids = target.encode_prompt(text, chat=True)
        sequence = ids + target.generate(ids, tokens, stop_on_eos=False).token_ids
        draft.decoder.reset()
        logits = draft.decoder.forward(sequence[:-1]).astype(np.float64)  # position i predicts i + 1
        rows = []
        for position in range(len(ids) - 1, len(sequence) - 1):
            row = logits[position]
            top = int(np.argmax(row))
            rows.append((1.0 / np.exp(row - row[top]).sum(), float(top == sequence[position + 1])))
        answers.append(np.array(rows))
    return answers


def replay(answers: list[np.ndarray], keep_going, draft_ms: float, slope_ms: float, plain_ms: float) -> float:
    """Modelled speed-up over plain decoding when proposing while ``keep_going(proposed, chance)``."""
    tokens = cost = 0.0
    for answer in answers:
        confidence, agree = answer[:, 0], answer[:, 1].astype(bool)
        position = 0
        while position < len(answer):
            proposed, chance = 0, 1.0
            while position + proposed < len(answer):
                proposed += 1
                chance *= confidence[position + proposed - 1]
                if not keep_going(proposed, chance):
                    break
            accepted = 0
            while accepted < proposed and agree[position + accepted]:
                accepted += 1
            tokens += accepted + 1
            cost += proposed * (draft_ms + slope_ms) + plain_ms
            position += accepted + 1
    return tokens / cost * plain_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True)
    parser.add_argument("--draft", required=True)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--draft-ms", type=float, default=2.6, help="one draft step (measured on 2 cores: 2.4-2.6)")
    parser.add_argument("--verify-slope-ms", type=float, default=0.8, help="each verified token beyond the first")
    parser.add_argument("--plain-ms", type=float, default=20.0, help="one plain target step")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    answers = record(args.target, args.draft, args.tokens)
    every = np.concatenate(answers)
    bins = []
    print(f"positions {len(every)}, agreement {every[:, 1].mean():.3f}")
    for low, high in zip(BINS[:-1], BINS[1:]):
        chosen = (every[:, 0] >= low) & (every[:, 0] < high)
        agreement = float(every[chosen, 1].mean()) if chosen.any() else None
        bins.append({"confidence": [low, min(high, 1.0)], "positions": int(chosen.sum()), "agreement": agreement})
        print(f"confidence {low:.1f}-{min(high, 1.0):.1f}: {int(chosen.sum()):4d} positions, agreement "
              + ("-" if agreement is None else f"{agreement:.2f}"))
    costs = (args.draft_ms, args.verify_slope_ms, args.plain_ms)
    rules = {f"gamma {gamma}": (lambda proposed, chance, gamma=gamma: proposed < gamma) for gamma in range(1, 8)}
    rules.update({f"chance >= {threshold}": (lambda proposed, chance, threshold=threshold: chance >= threshold
                                             and proposed < 12) for threshold in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)})
    replayed = {name: round(replay(answers, rule, *costs), 3) for name, rule in rules.items()}
    for name, speedup in replayed.items():
        print(f"{name:>16}: {speedup:.3f}x")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"target": args.target, "draft": args.draft, "tokens": args.tokens,
                               "agreement": round(float(every[:, 1].mean()), 4), "bins": bins,
                               "costs_ms": dict(zip(("draft", "verify_slope", "plain"), costs)),
                               "replayed_speedup": replayed}, indent=2) + "\n")


if __name__ == "__main__":
    main()
