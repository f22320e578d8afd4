"""`graphopt draft TARGET -o DRAFT [--recipe NAME]`: build a speculative-decoding draft from a target."""

from __future__ import annotations

import json

import click

from graphopt.drafting import build_draft
from graphopt.errors import GraphoptError
from graphopt.recipes import DRAFT_RECIPES
from graphopt.runtime.session import EXECUTION_PROVIDERS


@click.command("draft")
@click.argument("target", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="The draft model directory to write.")
@click.option("--recipe", type=click.Choice(["auto", *DRAFT_RECIPES]), default="auto", show_default=True,
              help="How to shrink the target; auto builds the candidates and keeps the fastest end to end.")
@click.option("--ep", type=click.Choice(list(EXECUTION_PROVIDERS)), default="cpu", show_default=True,
              help="Execution provider on which auto measures the candidates.")
@click.option("--distill-minutes", type=float, default=None, metavar="M",
              help="Training budget of the distilled recipe (default 10; 0 leaves it out of auto).")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def command(target, output, recipe, ep, distill_minutes, force, as_json):
    """Build a draft model for `graphopt generate TARGET --draft OUTPUT`."""
    if distill_minutes is not None and distill_minutes < 0:
        raise GraphoptError(f"--distill-minutes must be at least 0, got {distill_minutes}")
    draft, report = build_draft(target, output, recipe=recipe, force=force, ep=ep, distill_minutes=distill_minutes)
    report = {"draft": str(draft.path), **report, "size_bytes": draft.size_bytes(),
              "lineage": [step.name for step in draft.manifest.lineage]}
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(f"wrote {draft.path} (recipe {report['recipe']}, {report['size_bytes'] / 1e6:.1f} MB)")
    for name, figures in report.get("candidates", {}).items():
        click.echo(f"  {name}: {figures['decode_tokens_per_s']:.1f} tokens/s, "
                   f"acceptance {figures['acceptance_rate']:.2f}")
    if "plain" in report:
        click.echo(f"  plain target: {report['plain']['decode_tokens_per_s']:.1f} tokens/s")
        if not report["beats_plain"]:
            click.echo("  no candidate beats plain decoding here; `generate --draft` will measure that and "
                       "fall back to plain decoding")
