"""`graphopt generate MODEL_DIR --prompt TEXT [--draft DRAFT_DIR]`: stream text with ONNX Runtime.

With ``--draft``, decoding is speculative: the draft proposes tokens that the target verifies, and
the output is still the target's (identical tokens when greedy, the target's distribution when
sampling).
"""

from __future__ import annotations

import json
import sys

import click

from graphopt.runtime import Generator, Sampling
from graphopt.runtime.device import CACHES
from graphopt.runtime.session import EXECUTION_PROVIDERS
from graphopt.runtime.speculative import SpeculativeGenerator


@click.command("generate")
@click.argument("model_dir", type=click.Path())
@click.option("--prompt", required=True, help="The prompt text.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--greedy", is_flag=True, help="Greedy decoding (the default unless --temperature is given).")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True)
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 keeps every token.")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Seed for sampling.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--ep", type=click.Choice(list(EXECUTION_PROVIDERS)), default="cpu", show_default=True,
              help="ONNX Runtime execution provider (falls back to CPU when unavailable).")
@click.option("--draft", "draft_dir", type=click.Path(), default=None,
              help="Speculative decoding with this draft model directory (same tokenizer as MODEL_DIR).")
@click.option("--gamma", default="auto", show_default=True, callback=lambda ctx, param, value: _gamma(value),
              help="Draft tokens proposed per step: a number, or auto (greedy: while the draft's "
                   "confidence pays; sampled: adaptive).")
@click.option("--draft-ep", type=click.Choice(list(EXECUTION_PROVIDERS)), default=None,
              help="Execution provider of the draft (default: --ep).")
@click.option("--cache", type=click.Choice(CACHES), default="auto", show_default=True,
              help="Where the KV cache lives: static (fixed buffers written in place; needs GroupQueryAttention), "
                   "device (growing, on the provider's device), host (numpy); auto picks static when it can.")
@click.option("--cuda-graph/--no-cuda-graph", default=True, show_default=True,
              help="With a static cache on CUDA, replay each one-token step as a captured CUDA graph.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
def command(model_dir, prompt, chat, greedy, temperature, top_k, top_p, seed, max_new_tokens, ep, draft_dir, gamma,
            draft_ep, cache, cuda_graph, as_json):
    """Generate text after PROMPT with the model in MODEL_DIR."""
    if greedy and temperature > 0:
        raise click.UsageError("--greedy and --temperature > 0 contradict each other")
    if draft_dir is None and draft_ep is not None:
        raise click.UsageError("--draft-ep needs --draft")
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if draft_dir is None:
        generator = Generator(model_dir, ep=ep, cache=cache, cuda_graph=cuda_graph)
    else:
        generator = SpeculativeGenerator(model_dir, draft_dir, gamma=gamma, ep=ep, draft_ep=draft_ep, cache=cache,
                                         cuda_graph=cuda_graph)
    prompt_ids = generator.encode_prompt(prompt, chat=chat)
    text_stream = generator.tokenizer.stream()  # complete characters only, a few ids decoded per token
    printed = ""

    def stream(token: int) -> None:
        nonlocal printed
        text = text_stream.push(token)
        if len(text) > len(printed):
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text

    result = generator.generate(prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling,
                                on_token=None if as_json else stream)
    if as_json:
        click.echo(json.dumps(result.to_json(prompt)))
        return
    sys.stdout.write(result.text[len(printed):] + "\n")
    speculation = ""
    if draft_dir is not None:
        speculation = (f", acceptance {result.extra['acceptance_rate']:.2f}, "
                       f"{result.extra['tokens_per_target_call']:.2f} tokens per target call")
    click.echo(f"[{len(result.token_ids)} tokens, prefill {result.prefill_ms:.0f} ms, "
               f"decode {result.decode_tokens_per_s:.1f} tokens/s on {result.provider}{speculation}]", err=True)


def _gamma(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        gamma = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a number nor auto") from None
    if gamma < 1:
        raise click.BadParameter("must be at least 1")
    return gamma
