"""`graphopt eval MODEL_DIR [--text FILE] [--window W] [--reference REF_DIR] [--json]`: perplexity and agreement."""

from __future__ import annotations

import json

import click

from graphopt.evaluate import DEFAULT_TEXT, evaluate
from graphopt.runtime.session import EXECUTION_PROVIDERS


@click.command("eval")
@click.argument("model_dir", type=click.Path())
@click.option("--text", type=click.Path(), default=str(DEFAULT_TEXT), show_default="graphopt/data/eval-gpl3.txt",
              help="UTF-8 text to score. The default is the GPL-3 license text shipped with graphopt "
                   "(real English, about 7.5k tokens), so figures compare across models and machines.")
@click.option("--window", type=int, default=512, show_default=True,
              help="Scored tokens per window; windows of W+1 tokens start every W tokens, each from an empty cache.")
@click.option("--reference", type=click.Path(), default=None,
              help="Model directory to compare with: greedy token agreement and mean KL(reference || model).")
@click.option("--max-windows", type=int, default=None, help="Score only the first N windows.")
@click.option("--ep", type=click.Choice(list(EXECUTION_PROVIDERS)), default="cpu", show_default=True,
              help="Execution provider.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (perplexity, tokens, ...).")
def command(model_dir: str, text: str, window: int, reference: str | None, max_windows: int | None, ep: str,
            as_json: bool) -> None:
    """Perplexity of MODEL_DIR on a text (and agreement with --reference)."""
    result = evaluate(model_dir, text, window=window, reference_dir=reference, max_windows=max_windows, ep=ep)
    if as_json:
        click.echo(json.dumps({**result.to_json(), "text": str(text)}))
        return
    click.echo(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens ({result.windows} windows of {window})")
    if result.token_agreement is not None:
        click.echo(f"greedy agreement {100 * result.token_agreement:.2f}%  mean KL {result.mean_kl:.5f} nats")
