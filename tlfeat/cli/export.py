"""CLI: export."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tlfeat.apps.export import FORMATS
from tlfeat.cli.common import app, user_errors


@app.command()
@user_errors
def export(
    cache: Path = typer.Argument(..., help="Cache file (.h5) written by `tlfeat extract`."),
    format: str = typer.Option(FORMATS[0], "--format", "-f", help="parquet (part-NNNNN.parquet files; needs pyarrow: pip install 'tlfeat\\[export]') or npy (features.npy + rows.csv + meta.json)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder to write. Default: <cache without .h5>-<format>/ beside the cache."),
    chunk_rows: Optional[int] = typer.Option(None, "--chunk-rows", help="Rows read and written at a time (one Parquet row group): bounds memory. Default: about 4 MiB of features."),
    rows_per_file: Optional[int] = typer.Option(None, "--rows-per-file", help="Most rows in one Parquet file. Default: about 256 MiB of features."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier export in --out (only its own files) instead of refusing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Export a cache as Parquet (for pandas, DuckDB, Spark, Ray Data) or NumPy files.

    Columns: path, label, class_name, split, features (a fixed-size list of
    float32). Streams a chunk at a time: memory stays bounded whatever the
    cache's size.
    """
    from tlfeat.apps.export import export as run_export

    summary = run_export(cache, format=format, out=out, chunk_rows=chunk_rows, rows_per_file=rows_per_file,
                         overwrite=overwrite, progress=not quiet)
    typer.echo(
        f"{summary.out}: {summary.n_rows} rows x {summary.feature_dim} dims as {summary.format} "
        f"in {len(summary.files)} file{'' if len(summary.files) == 1 else 's'}; {summary.seconds:.1f} s"
    )
