"""Commands for analyses on cached embeddings: audit, similar, map (no backbone runs, except to embed query files)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tlfeat.analysis.duplicates import EXACT_MAX_ROWS as AUDIT_EXACT_MAX_ROWS
from tlfeat.analysis.similar import EXACT_MAX_ROWS as SIMILAR_EXACT_MAX_ROWS
from tlfeat.cli.common import app, user_errors
from tlfeat.cli.heads import TRUST_HELP


@app.command()
@user_errors
def audit(
    cache: Path = typer.Argument(..., help="A cache written by extract."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder. Default: audit/<cache stem>/ beside the cache (never inside the dataset)."),
    dup_threshold: Optional[float] = typer.Option(None, "--dup-threshold", help="Cosine similarity from which two images count as near-duplicates. Default: chosen from the distribution of nearest-neighbour similarities, and printed."),
    index: str = typer.Option("auto", "--index", help=f"Duplicate search: exact (blocked matrix products), faiss (approximate; an index saved beside the cache, needs faiss-cpu) or auto (exact up to {AUDIT_EXACT_MAX_ROWS:,} images)."),
    folds: int = typer.Option(5, "--folds", help="Cross-validation folds of the out-of-fold predictions behind the label review."),
    seed: int = typer.Option(0, "--seed", help="Seed of the folds and of the linear head."),
    no_sheets: bool = typer.Option(False, "--no-sheets", help="No PNG contact sheets (they read the images from the dataset folder)."),
) -> None:
    """Near-duplicates and train/val-vs-test leaks, byte-identical files, likely label errors, confused classes.

    Label errors: every image (all splits) gets out-of-fold probabilities from a
    cross-validated logistic regression; cleanlab flags and ranks the unlikely
    labels (pip install cleanlab). Writes duplicates.csv, label_issues.csv,
    confusion.csv, contact sheets (PNG) and summary.md, and prints the summary.
    """
    from tlfeat.analysis import audit as run_audit

    result = run_audit(cache, out=out, dup_threshold=dup_threshold, index=index, folds=folds, seed=seed,
                       sheets=not no_sheets)
    typer.echo(result.summary, nl=False)
    typer.echo(f"wrote {result.out}/")


@app.command()
@user_errors
def similar(
    cache: Path = typer.Argument(..., help="A cache written by extract."),
    queries: list[str] = typer.Argument(..., help="Image paths as stored in the cache (train/Coast/image_0001.jpg), image files or folders. Files the cache does not hold are embedded with its own backbone, weights and image size."),
    top: int = typer.Option(10, "--top", "-k", help="Similar images to list per query."),
    index: str = typer.Option("auto", "--index", help=f"exact (blocked matrix products, memory bounded by the block), faiss (approximate; an index built once and saved as <cache>.faiss, needs faiss-cpu) or auto (exact up to {SIMILAR_EXACT_MAX_ROWS:,} images)."),
    nprobe: int = typer.Option(16, "--nprobe", help="With faiss: index cells scanned per query (more: slower, fewer misses)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for similar.csv and similar.png. Default: similar/<cache stem>/ beside the cache."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per forward pass when embedding query files."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """The cached images most similar to each query, by cosine similarity of the embeddings: a table and a contact sheet.

    A query that is a cached image never lists itself, so an image's copy comes first.
    """
    from tlfeat.analysis.similar import similar as run_similar
    from tlfeat.reports import markdown_table

    result = run_similar(cache, queries, top=top, index=index, nprobe=nprobe, batch_size=batch_size,
                         progress=not quiet, out=out)
    rows = [[q.query if m.rank == 1 else "", m.rank, round(m.similarity, 4), m.split, m.label, m.path]
            for q in result.queries for m in q.matches]
    typer.echo(markdown_table(["query", "rank", "similarity", "split", "class", "image"], rows), nl=False)
    for path, reason in result.skipped:
        typer.echo(f"skipped {path}: {reason}", err=True)
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    built = "; built its index (saved beside the cache unless a note above says otherwise)" if result.index_built else ""
    typer.echo(f"search: {result.search}{built}; wrote {', '.join(str(f) for f in result.files)}")


@app.command("map")
@user_errors
def map_command(
    cache: Path = typer.Argument(..., help="A cache written by extract."),
    method: str = typer.Option("tsne", "--method", "-m", help="tsne (scikit-learn, the default), pca (scikit-learn, seconds) or umap (needs umap-learn)."),
    head: Optional[Path] = typer.Option(None, "--head", help="A head written by fit-head on this cache's features: the test images it gets wrong are marked with crosses."),
    trust: bool = typer.Option(False, "--trust", help=TRUST_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder. Default: map/<cache stem>/ beside the cache."),
    seed: int = typer.Option(0, "--seed", help="Seed of the projection and of the sample."),
    max_points: int = typer.Option(20000, "--max-points", help="Map a seeded random sample of this many images when the cache holds more."),
) -> None:
    """A 2-D map of the embeddings coloured by class (map-<method>.png) and the coordinates of every image (map-<method>.csv)."""
    from tlfeat.analysis import embedding_map

    result = embedding_map(cache, method=method, out=out, head=head, seed=seed, max_points=max_points, trust=trust)
    for note in result.map.notes:
        typer.echo(f"note: {note}")
    if result.map.predicted is not None:
        wrong = int(result.map.wrong(result.data.labels).sum())
        tested = int((result.map.predicted >= 0).sum())
        typer.echo(f"{head}: {wrong} of {tested} test images wrong, marked")
    typer.echo(f"wrote {result.png}, {result.csv}")
