"""`graphopt vocabulary DRAFT -o OUT`: a draft's LM head cut to the tokens it is likely to propose."""

from __future__ import annotations

import click

from graphopt.commands import default, report_step
from graphopt.vocabulary import VocabularyConfig, restrict_vocabulary


@click.command("vocabulary")
@click.argument("model_dir", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Model directory to create.")
@click.option("--size", type=int, default=default(VocabularyConfig, "size"), show_default=True,
              help="Tokens the head keeps (the most frequent; BOS and EOS always).")
@click.option("--counts", type=click.Path(), default=None,
              help="Token frequencies: a .npy of one count per token id (default: sample from MODEL_DIR).")
@click.option("--sample-tokens", type=int, default=default(VocabularyConfig, "sample_tokens"), show_default=True,
              help="Tokens MODEL_DIR samples to count frequencies, without --counts.")
@click.option("--seed", type=int, default=default(VocabularyConfig, "seed"), show_default=True)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def command(model_dir: str, output: str, size: int, counts: str | None, sample_tokens: int, seed: int,
            force: bool) -> None:
    """Cut the LM head of MODEL_DIR, a float draft, to its SIZE most frequent tokens, into OUTPUT.

    A cheaper draft step for speculative decoding; the target still verifies with its whole
    vocabulary, so the output does not change. Quantize afterwards.

    Example: graphopt vocabulary draft-fused -o draft-8k && graphopt quantize draft-8k --weights int8 -o draft
    """
    record = restrict_vocabulary(model_dir, output, size=size, counts=counts, sample_tokens=sample_tokens, seed=seed,
                                 force=force)
    report_step(record.step)
    click.echo(str(record.output.path))
