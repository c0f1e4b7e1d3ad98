"""CLI: recipe."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from tlfeat.apps.recipe_book import DEFAULT_RECIPE, RECIPES, get_recipe
from tlfeat.cli.common import DEFAULT_SPLIT, app, parse_ratios, user_errors

if TYPE_CHECKING:
    from tlfeat.apps.recipe import MemberRun

RECIPE_CHOICES = "; ".join(f"{r.name}: {r.description}" for r in RECIPES.values())


def _echo_member(run: MemberRun) -> None:
    if run.computed:
        done = f"computed {run.computed} ({run.seconds:.0f} s with the model's loading, {run.images_per_s:.1f} img/s computing)"
        done += f", reused {run.reused}" if run.reused else ""
    else:
        done = "up to date"
    typer.echo(f"  {run.member.label:<28} {run.cache}: {done}")


@app.command()
@user_errors
def recipe(
    data: Path = typer.Argument(..., help="Dataset folder, as for extract."),
    name: str = typer.Option(DEFAULT_RECIPE, "--recipe", "-r", help=f"Which recipe. {RECIPE_CHOICES}."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where the member caches live. Default: cache/, with extract's default file names (so the two share caches)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Head folder. Default: <cache dir>/heads/<dataset>-recipe-<name>/"),
    seed: int = typer.Option(0, "--seed", help="Seed of the split and of the head."),
    split: str = typer.Option(DEFAULT_SPLIT, "--split", help="train,val,test shares for a flat dataset (val carved from train when only train/test exist)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="As extract's, for the member caches: re-label them to another --seed/--split, or replace caches of other settings, another dataset folder or damaged ones."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Run a tested recipe end to end: extract its members (cached, reused), fuse, fit logistic regression, report.

    C is chosen by 5-fold cross-validation over train+val, then the head is refitted on train+val and scored on test.
    The head is saved like fit-head's: `tlfeat predict HEAD IMAGES` embeds new images the same way.
    """
    from tlfeat.apps.recipe import run_recipe
    from tlfeat.reports import interval_text

    spec = get_recipe(name)
    typer.echo(f"recipe {spec.name}: {spec.description}")
    result = run_recipe(
        data, name, cache_dir=cache_dir, out=out, seed=seed, ratios=parse_ratios(split), progress=not quiet,
        on_member=_echo_member, overwrite=overwrite,
    )
    fitted = result.fitted
    if fitted.trials:
        typer.echo(f"  cross-validated accuracy by C ({fitted.folds} folds over train+val): "
                   + "  ".join(f"C={t['C']} {t['cv_accuracy']:.4f}" for t in fitted.trials))
    test = fitted.metrics.get("test")
    scored = (f": test {test['accuracy']:.4f} (95% CI {interval_text(test['accuracy_ci95'])}, "
              f"macro-F1 {test['macro_f1']:.4f}, n={test['n']})" if test else "")
    caches = "1 cache" if len(result.members) == 1 else f"{len(result.members)} fused caches"
    typer.echo(f"logreg C={fitted.c} on {caches}, refitted on train+val{scored}")
    for note in fitted.notes:
        typer.echo(f"note: {note}", err=True)
    seconds = sum(run.seconds for run in result.members if run.computed)
    typer.echo(f"extraction this run {seconds:.0f} s; head fit {fitted.fit_seconds + fitted.search_seconds:.1f} s")
    model = result.head.files["model"]
    if result.head.replaced:  # as fit-head says it
        typer.echo(f"replaced {model.name} (was {result.head.replaced})")
    typer.echo(f"head: {model}  (tlfeat predict {model} IMAGES)")
