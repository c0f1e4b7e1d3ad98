"""CLI: fit-head, predict, evaluate, demo."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from tlfeat.cli.common import app, program_name, user_errors
from tlfeat.fileio import one_line_path
from tlfeat.heads.registry import DEFAULT_CHUNK_ROWS, DEFAULT_PASSES, HEADS, STREAMABLE_HEADS

if TYPE_CHECKING:  # the real imports stay inside the commands, so --help stays fast
    from tlfeat.extraction.run import ExtractSummary
    from tlfeat.heads.fit import FitSummary, HeadResult

HEAD_CHOICES = ", ".join(HEADS)
SEARCHED = ", ".join(f"{spec.label} ({name})" for name, spec in HEADS.items())
STREAMABLE = " or ".join(STREAMABLE_HEADS)


TRUST_HELP = (
    "Load a head holding types tlfeat does not trust, or a tlfeat 0.1 .joblib pickle: loading them can run "
    "code from the file. Only for files you made or whose maker you trust."
)


def _echo_head(result: HeadResult) -> None:
    """One line per fitted head as it finishes, then what it replaced, its search trials and notes."""
    scores = "  ".join(f"{split} {s['accuracy']:.3f}" for split, s in result.scores.items())
    params = ", ".join(f"{k}={v}" for k, v in result.params.items())
    typer.echo(f"{result.head:<10} {params:<12} acc: {scores}  (fit {result.fit_seconds:.1f} s)")
    if result.replaced:
        typer.echo(f"{'':<10} replaced {result.files['model'].name} (was {result.replaced})")
    if result.search:
        label = next(iter(result.params))
        trials = ", ".join(f"{t[label]}: " + ("cannot be fitted" if t["val_accuracy"] is None else f"{t['val_accuracy']:.3f}")
                           for t in result.search)
        typer.echo(f"{'':<10} val accuracy by {label}: {trials}; {result.search_seconds:.1f} s in all")
    for note in result.notes:
        typer.echo(f"{'':<10} note: {note}")


def _echo_skip(head: str, reason: str) -> None:
    typer.echo(f"{head:<10} skipped: {reason}")


def _echo_fit_summary(summary: FitSummary) -> None:
    typer.echo("")
    typer.echo(summary.table)
    names = ", ".join(r.head for r in summary.results)
    kept = [h for h in summary.heads if h not in {r.head for r in summary.results}]
    typer.echo(
        f"wrote {summary.out}/: <head>.skops (+ .metrics.json, .confusion.png) for {names}; summary.md, summary.csv "
        f"over every head there" + (f" (kept from earlier runs: {', '.join(kept)})" if kept else "")
    )


@app.command("fit-head")
@user_errors
def fit_head(
    caches: list[Path] = typer.Argument(..., help="A cache, or several caches over the same images to fuse column-wise (e.g. resnet101 + vgg16)."),
    head: list[str] = typer.Option(["logreg"], "--head", help=f"{HEAD_CHOICES}, or all (one comparison table). Several: repeat --head or separate by commas (--head logreg,knn)."),
    search: bool = typer.Option(False, "--search", help=f"Choose on the val split: {SEARCHED}."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder. Default: heads/<cache stem(s)>/ beside the first cache."),
    seed: int = typer.Option(0, "--seed", help="Seed of the heads' own randomness (initialisation, shuffling)."),
    streaming: bool = typer.Option(False, "--streaming", help=f"For caches larger than memory: {STREAMABLE} by SGD over chunks of rows (one cache, no --search)."),
    chunk_rows: int = typer.Option(DEFAULT_CHUNK_ROWS, "--chunk-rows", help="With --streaming: rows read at a time (bounds memory)."),
    passes: int = typer.Option(DEFAULT_PASSES, "--passes", help="With --streaming: passes over the train rows, tiles of rows shuffled each pass."),
) -> None:
    """Fit classification heads on cached features: fit on train, select on val, score train/val/test."""
    from tlfeat.heads.fit import fit_heads

    names = [name.strip() for given in head for name in given.split(",")]  # --head a --head b, or --head a,b
    summary = fit_heads(caches, head=names, search=search, out=out, seed=seed, on_result=_echo_head,
                        on_skip=_echo_skip, streaming=streaming, chunk_rows=chunk_rows, passes=passes)
    _echo_fit_summary(summary)


@app.command()
@user_errors
def predict(
    model: Path = typer.Argument(..., help="A head's .skops written by fit-head, or a fine-tune run folder / its model.keras."),
    images: list[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively for images)."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Also write the predictions (and skipped files) to this CSV."),
    top: int = typer.Option(1, "--top", help="Show the K most probable classes per image."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per forward pass."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    trust: bool = typer.Option(False, "--trust", help=TRUST_HELP),
) -> None:
    """Classify images with a fitted head (embedding them exactly as its training cache was) or a fine-tuned model.

    A path that does not exist is an error; files that cannot be decoded are listed as skipped.
    """
    from tlfeat.apps.predict import predict_images

    result = predict_images(model, images, top=top, batch_size=batch_size, progress=not quiet, trust=trust, csv=csv)
    for p in result.predictions:  # one line, tab-separated, whatever the file and class names hold
        typer.echo("\t".join([one_line_path(p.path), *(f"{one_line_path(name)} {prob:.3f}" for name, prob in p.top)]))
    for path, reason in result.skipped:
        typer.echo(f"skipped {one_line_path(path)}: {reason}", err=True)
    if csv is not None:
        typer.echo(f"wrote {csv}", err=True)


@app.command()
@user_errors
def evaluate(
    model: Path = typer.Argument(..., help="A head's .skops written by fit-head."),
    caches: list[Path] = typer.Argument(..., help="Labelled cache(s) extracted with the head's settings; a fused head takes one per backbone, in its order."),
    split: Optional[str] = typer.Option(None, "--split", help="Score only this split (train, val or test). Default: every split present."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write per-class scores and confusion matrices to this JSON file."),
    trust: bool = typer.Option(False, "--trust", help=TRUST_HELP),
) -> None:
    """Score a fitted head on cached features, e.g. a new labelled set extracted with the same backbone.

    Refuses a cache whose class list, backbone, weights, image size or
    preprocessing differ from what the head was fitted on. Rows the head was
    fitted on (found by image and by features, whatever the cache's split) are
    left out of val and test, and counted. The 95% CI is the accuracy's Wilson
    interval over the images scored: how far it could move on another draw of
    as many images.
    """
    from tlfeat.apps.evaluate import evaluate_on_caches
    from tlfeat.reports import interval_text, markdown_table

    result = evaluate_on_caches(model, caches, split=split, trust=trust, json=json_out)
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    rows = [[name, m["n"], m["accuracy"], interval_text(m["accuracy_ci95"]), m["macro_f1"]]
            for name, m in result.metrics.items()]
    typer.echo(markdown_table(["split", "images", "accuracy", "95% CI", "macro-F1"], rows), nl=False)
    if json_out is not None:
        typer.echo(f"wrote {json_out}")


@app.command()
@user_errors
def demo(
    ctx: typer.Context,
    out: Path = typer.Option(Path("cache"), "--out", "-o", help="Folder for the digits dataset, its cache and the heads."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Offline end-to-end demo on scikit-learn's 1,797 handwritten digits: write PNGs, extract, fit every head."""
    from tlfeat.apps.demo import run_demo
    from tlfeat.cli.extract import summary_line

    def echo_extracted(dataset: Path, n_written: int, extracted: ExtractSummary) -> None:
        typer.echo(summary_line(extracted))
        typer.echo("")

    result = run_demo(out, progress=not quiet, on_result=_echo_head, on_extract=echo_extracted,
                      on_dataset=lambda dataset, n_written: typer.echo(f"dataset {dataset}/ ({n_written} PNGs written)"))
    _echo_fit_summary(result.fit)
    example = next(iter(sorted((result.dataset / "3").glob("*.png"))), result.dataset)
    typer.echo(
        f"demo took {result.seconds:.0f} s; try: {program_name(ctx)} predict {result.fit.out / 'logreg.skops'} {example}"
    )
