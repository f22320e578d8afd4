"""`graphopt generate MODEL_DIR --prompt TEXT`: stream text from a model directory with ONNX Runtime."""

from __future__ import annotations

import json
import sys

import click

from graphopt.runtime.session import EXECUTION_PROVIDERS


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
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
def command(model_dir, prompt, chat, greedy, temperature, top_k, top_p, seed, max_new_tokens, ep, as_json):
    """Generate text after PROMPT with the model in MODEL_DIR."""
    from graphopt.runtime import Generator, Sampling

    if greedy and temperature > 0:
        raise click.UsageError("--greedy and --temperature > 0 contradict each other")
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    generator = Generator(model_dir, ep=ep)
    prompt_ids = generator.encode_prompt(prompt, chat=chat)
    streamed: list[int] = []
    printed = ""

    def stream(token: int) -> None:
        nonlocal printed
        streamed.append(token)
        text = generator.tokenizer.decode(streamed)
        # Print only complete characters: a partial UTF-8 sequence decodes to U+FFFD.
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text

    result = generator.generate(prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling,
                                on_token=None if as_json else stream)
    if as_json:
        click.echo(json.dumps(result.to_json(prompt)))
        return
    sys.stdout.write(result.text[len(printed):] + "\n")
    click.echo(f"[{len(result.token_ids)} tokens, prefill {result.prefill_ms:.0f} ms, "
               f"decode {result.decode_tokens_per_s:.1f} tokens/s on {result.provider}]", err=True)
