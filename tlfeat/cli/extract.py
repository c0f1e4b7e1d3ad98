"""CLI: extract, backbones."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from tlfeat.backbones import DEFAULT_BACKBONE, get_backbone, list_backbones
from tlfeat.backbones.preprocessing import TTA_MODES
from tlfeat.cli.common import DEFAULT_SPLIT, app, parse_ratios, user_errors
from tlfeat.data.scan import is_routine
from tlfeat.extraction.run import ENGINES

if TYPE_CHECKING:
    from tlfeat.extraction.run import ExtractSummary

BACKBONE_NAMES = ", ".join(b.name for b in list_backbones())


@app.command()
@user_errors
def extract(
    data: Path = typer.Argument(..., help="Dataset folder: one sub-folder per class, or train/\\[val/]test/ folders of class folders."),
    backbone: str = typer.Option(DEFAULT_BACKBONE, "--backbone", "-b", help=f"One of: {BACKBONE_NAMES} (`tlfeat backbones` lists sizes and weight sources)."),
    weights: str = typer.Option("imagenet", "--weights", "-w", help="imagenet (bundled for the offline backbones, a Keras download for the others), none (random, for smoke tests) or a path to a Keras weights file."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Cache file to write. Default: in cache/, <dataset>-<backbone>.h5, with -<size> before .h5 when not the backbone's own size and -flip with --tta flip."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per forward pass. Default: 32 on CPU, 256 on a GPU. Refused when its decoded images would not fit in half the available memory."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Resize images to this square size, 32 to 1024. Default: the backbone's (`tlfeat backbones`)."),
    tta: str = typer.Option(TTA_MODES[0], "--tta", help="Test-time augmentation: none, or flip (the mean of the features of each image and its mirror; twice the compute)."),
    dtype: str = typer.Option("float32", "--dtype", help="Storage type of the features: float32 or float16."),
    seed: int = typer.Option(0, "--seed", help="Seed of the train/val/test split (each image is placed by a hash of its path and this seed)."),
    split: str = typer.Option(DEFAULT_SPLIT, "--split", help="train,val,test shares for a flat dataset (val carved from train when only train/test exist)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a cache made with other settings (or damaged) instead of refusing; re-label a cache split with another --seed/--split."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    # "\\[" keeps Rich from reading [data] as markup in --help.
    engine: str = typer.Option(ENGINES[0], "--engine", help="local (this process) or ray (a Ray Data pipeline: decoding tasks, one backbone per actor; needs pip install 'ray\\[data]')."),
    address: Optional[str] = typer.Option(None, "--address", help="With --engine ray: the Ray cluster to join (auto, host:6379 or ray://host:10001). Default: the Ray instance `ray start` left on this machine, else a private one for this run."),
    num_gpus_per_worker: Optional[float] = typer.Option(None, "--num-gpus-per-worker", help="With --engine ray: GPUs per embedding actor. Default: 1 where the cluster has GPUs, else 0 (CPU actors)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Local engine: decoding processes (default: one per available core). With --engine ray: embedding actors (default: one per GPU share, or one per node without GPUs)."),
) -> None:
    """Embed every image once with a pretrained backbone and cache the pooled features in HDF5.

    Resumable and incremental: rerunning computes only images that are new or
    changed since the last run; an interrupted run continues where it stopped
    (with either engine: both write the same shards and the same cache).
    """
    from tlfeat.extraction.run import extract as run_extract

    ray_options = None
    if address is not None or num_gpus_per_worker is not None or (engine == "ray" and workers is not None):
        from tlfeat.extraction.ray_engine import RayOptions

        ray_options = RayOptions(address=address, num_gpus_per_worker=num_gpus_per_worker, workers=workers)
    summary = run_extract(
        data, out=out, backbone=backbone, weights=weights, image_size=image_size,
        batch_size=batch_size, dtype=dtype, seed=seed, ratios=parse_ratios(split),
        overwrite=overwrite, progress=not quiet, engine=engine, ray_options=ray_options, tta=tta,
        workers=None if engine == "ray" else workers,
    )
    typer.echo(summary_line(summary))
    for note in summary.notes:
        typer.echo(f"note: {note}")
    for path, reason in summary.skipped[:20]:
        typer.echo(f"  skipped {path}: {reason}")
    if len(summary.skipped) > 20:
        typer.echo(f"  ... and {len(summary.skipped) - 20} more (listed in the cache's skipped_paths)")
    notable = [(path, reason) for path, reason in summary.ignored if not is_routine(reason)]
    for path, reason in notable[:10]:
        typer.echo(f"  ignored {path}: {reason}")
    if len(notable) > 10:
        typer.echo(f"  ... and {len(notable) - 10} more ignored (ExtractSummary.ignored in Python)")


def summary_line(summary: ExtractSummary) -> str:
    """The cache, then this run's work, in counts that add up: rows + skipped = attempted + reused."""
    splits = ", ".join(f"{k} {v}" for k, v in summary.split_counts.items())
    if summary.up_to_date:
        work = f"up to date, {summary.n_reused} reused, nothing attempted"
    else:
        skipped_now = summary.n_computed - summary.n_embedded
        work = (f"{summary.n_computed} attempted ({summary.n_embedded} embedded, {skipped_now} skipped), "
                f"{summary.n_reused} reused")
    if summary.n_retried:  # decoding only, to see whether a fix (chmod, mv) made them readable: no model run
        work += f" ({summary.n_retried} previously skipped files decoded again, still unreadable)" \
            if summary.up_to_date else f" ({summary.n_retried} previously skipped files decoded again)"
    rate = f", {summary.images_per_s:.1f} images/s" if summary.n_computed else ""
    return (
        f"{summary.out}: {summary.n_images} images x {summary.feature_dim} dims ({splits}), "
        f"{summary.n_skipped} image files skipped; this run: {work}; {_counted_reasons(summary.ignored, 'ignored')}; "
        f"{summary.seconds:.1f} s{rate}"
    )


def _counted_reasons(items: list[tuple[str, str]], what: str) -> str:
    """'N what (n1 reason1, n2 reason2)', most frequent reason first."""
    counts = Counter(reason for _, reason in items)
    return f"{len(items)} {what}" + (f" ({', '.join(f'{n} {reason}' for reason, n in counts.most_common())})" if counts else "")


@app.command("backbones")
def backbones() -> None:
    """List the registered backbones: native input size, feature dimension, parameters, preprocessing, weights.

    weights "offline": ImageNet weights ship with an installed package; "download": Keras fetches them
    on first use (network needed), or pass --weights FILE.
    """
    specs = list_backbones()
    width = max(len(spec.name) for spec in specs)
    typer.echo(f"{'name':<{width}}  {'size':>4}  {'dim':>4}  {'parameters':>10}  {'preprocessing':<13}  weights")
    for spec in specs:
        typer.echo(
            f"{spec.name:<{width}}  {spec.input_size:>4}  {spec.feature_dim:>4}  "
            f"{spec.parameters / 1e6:>9.2f}M  {spec.preprocessor.mode:<13}  {spec.weight_source}"
        )
    typer.echo(f"\ndefault: {DEFAULT_BACKBONE} ({get_backbone(DEFAULT_BACKBONE).weight_source})")
