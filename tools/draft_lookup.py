"""Would a draft-free speculative decoder (prompt lookup, n-gram matching) pay on graphopt's chat answers?

    python tools/draft_lookup.py MODEL_DIR [--prompts 16] [--tokens 128] [--json OUT.json]

The model answers chat prompts greedily (the GPU check's prompt first, then ``tools/bench_int4.py``'s
chat prompts). Each answer is then replayed under prompt-lookup drafting (as transformers'
``prompt_lookup_num_tokens``): at every verify the last 3, 2 or 1 tokens of the context so far
(prompt and answer) are looked up at their latest earlier occurrence, and the up to ``k`` tokens
that followed it are proposed; the verify keeps the proposals that equal the answer and adds its
own token. Printed: tokens per verify call for each ``k``, per prompt and over all prompts. A
replay is exact for greedy decoding (the proposals depend only on tokens already decided); with a
free draft, tokens per verify divided by a verify's cost in plain steps bounds the speed-up.
It models, it does not time.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench_int4 import CHAT_PROMPTS  # noqa: E402

GPU_CHECK_PROMPT = "Write a short paragraph about the history of Paris."  # tools/gpu_check.py's PROMPT
PROPOSALS = (1, 2, 3, 4, 6, 8)


def lookup(context: list[int], proposals: int, longest: int = 3) -> list[int]:
    """The tokens that followed the latest earlier occurrence of the context's last n tokens (n = longest .. 1)."""
    for size in range(min(longest, len(context) - 1), 0, -1):
        tail = context[-size:]
        for start in range(len(context) - size - 1, -1, -1):
            if context[start:start + size] == tail:
                return context[start + size:start + size + proposals]
    return []


def verify_calls(prompt: list[int], answer: list[int], proposals: int) -> tuple[int, int, int]:
    """Verify calls to produce ``answer`` greedily, tokens proposed, tokens accepted."""
    context, done, calls, proposed, accepted = list(prompt), 0, 0, 0, 0
    while done < len(answer):
        proposal = lookup(context, proposals)
        kept = 0
        while kept < len(proposal) and done + kept < len(answer) and proposal[kept] == answer[done + kept]:
            kept += 1
        context += answer[done:done + kept + 1]
        done += kept + 1
        calls, proposed, accepted = calls + 1, proposed + len(proposal), accepted + kept
    return calls, proposed, accepted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=pathlib.Path)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args()

    from graphopt.runtime import Generator

    generator = Generator(args.model_dir, ep="cpu")
    prompts = [GPU_CHECK_PROMPT, *CHAT_PROMPTS][:args.prompts]
    per_prompt, totals, tokens = [], {k: [0, 0, 0] for k in PROPOSALS}, 0
    print(f"{'prompt':42s} " + " ".join(f"k={k:<4d}" for k in PROPOSALS))
    for prompt in prompts:
        prompt_ids = generator.encode_prompt(prompt, chat=True)
        answer = generator.generate(prompt_ids, max_new_tokens=args.tokens, stop_on_eos=False).token_ids
        tokens += len(answer)
        rates = {}
        for k in PROPOSALS:
            counts = verify_calls(prompt_ids, answer, k)
            totals[k] = [total + count for total, count in zip(totals[k], counts)]
            rates[k] = len(answer) / counts[0]
        per_prompt.append({"prompt": prompt, "tokens_per_verify": rates})
        print(f"{prompt[:42]:42s} " + " ".join(f"{rates[k]:<6.2f}" for k in PROPOSALS), flush=True)
    summary = {k: {"tokens_per_verify": tokens / calls, "acceptance": accepted / max(proposed, 1)}
               for k, (calls, proposed, accepted) in totals.items()}
    print(f"{'all prompts':42s} " + " ".join(f"{summary[k]['tokens_per_verify']:<6.2f}" for k in PROPOSALS))
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model_dir), "tokens": args.tokens,
                                         "per_prompt": per_prompt, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
