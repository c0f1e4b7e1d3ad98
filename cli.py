"""tlfeat command line: parse options, call into the tlfeat package, print results."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import typer

from tlfeat.errors import TlfeatError

# TensorFlow's C++ start-up chatter (CPU feature notes, oneDNN banner) is not for users.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

app = typer.Typer(
    help="Transfer learning with cached ImageNet CNN embeddings: extract once, fit heads in seconds.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def user_errors(command: Callable) -> Callable:
    """Print a TlfeatError as one line on stderr and exit 1, with no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TlfeatError as exc:
            typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from None

    return wrapper


def _parse_ratios(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.replace("/", ",").split(","))
    except ValueError:
        raise TlfeatError(f"--split {text!r}: expected three numbers like 56.25,18.75,25") from None
    if len(parts) != 3:
        raise TlfeatError(f"--split {text!r}: expected three numbers (train,val,test)")
    return parts  # type: ignore[return-value]


@app.command()
@user_errors
def extract(
    data: Path = typer.Argument(..., help="Dataset folder: one sub-folder per class, or train/\\[val/]test/ folders of class folders."),
    backbone: str = typer.Option("efficientnet_lite0", "--backbone", "-b", help="efficientnet_lite0 (offline ImageNet weights), resnet101 (2048-d) or vgg16 (512-d)."),
    weights: str = typer.Option("imagenet", "--weights", "-w", help="imagenet (Keras download for resnet101/vgg16; bundled for efficientnet_lite0), none (random, for smoke tests) or a path to a Keras weights file."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Cache file to write. Default: cache/<dataset>-<backbone>.h5"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per forward pass. Default: 32 on CPU, 256 on a GPU."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Resize images to this square size. Default: the backbone's (224)."),
    dtype: str = typer.Option("float32", "--dtype", help="Storage type of the features: float32 or float16."),
    seed: int = typer.Option(0, "--seed", help="Seed of the stratified train/val/test split."),
    split: str = typer.Option("56.25,18.75,25", "--split", help="train,val,test shares for a flat dataset (val carved from train when only train/test exist)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a cache made with other settings instead of refusing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    # "\\[" keeps Rich from reading [data] as markup in --help.
    engine: str = typer.Option("local", "--engine", help="local (this process) or ray (a Ray Data pipeline: decoding tasks, one backbone per actor; needs pip install 'ray\\[data]')."),
    address: Optional[str] = typer.Option(None, "--address", help="With --engine ray: the Ray cluster to join (auto, host:6379 or ray://host:10001). Default: the Ray instance `ray start` left on this machine, else a private one for this run."),
    num_gpus_per_worker: Optional[float] = typer.Option(None, "--num-gpus-per-worker", help="With --engine ray: GPUs per embedding actor. Default: 1 where the cluster has GPUs, else 0 (CPU actors)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="With --engine ray: embedding actors. Default: one per GPU share, or one per node without GPUs."),
) -> None:
    """Embed every image once with a pretrained backbone and cache the pooled features in HDF5.

    Resumable and incremental: rerunning computes only images that are new or
    changed since the last run; an interrupted run continues where it stopped
    (with either engine: both write the same shards and the same cache).
    """
    from tlfeat.extract import extract as run_extract

    ray_options = None
    if address is not None or num_gpus_per_worker is not None or workers is not None:
        from tlfeat.ray_engine import RayOptions

        ray_options = RayOptions(address=address, num_gpus_per_worker=num_gpus_per_worker, workers=workers)
    summary = run_extract(
        data, out=out, backbone=backbone, weights=weights, image_size=image_size,
        batch_size=batch_size, dtype=dtype, seed=seed, ratios=_parse_ratios(split),
        overwrite=overwrite, progress=not quiet, engine=engine, ray_options=ray_options,
    )
    splits = ", ".join(f"{k} {v}" for k, v in summary.split_counts.items())
    status = "up to date, nothing computed" if summary.up_to_date else (
        f"computed {summary.n_computed}, reused {summary.n_reused}"
    )
    typer.echo(
        f"{summary.out}: {summary.n_images} images x {summary.feature_dim} dims ({splits}); {status}; "
        f"skipped {summary.n_skipped}; ignored {len(summary.ignored)} non-image files; "
        f"{summary.seconds:.1f} s" + (f", {summary.images_per_s:.1f} images/s" if summary.n_computed else "")
    )
    for path, reason in summary.skipped[:20]:
        typer.echo(f"  skipped {path}: {reason}")
    if len(summary.skipped) > 20:
        typer.echo(f"  ... and {len(summary.skipped) - 20} more (listed in the cache's skipped_paths)")


@app.command("backbones")
def list_backbones() -> None:
    """List the registered backbones."""
    from tlfeat.backbones import DEFAULT_BACKBONE, REGISTRY

    for spec in REGISTRY.values():
        default = " (default)" if spec.name == DEFAULT_BACKBONE else ""
        typer.echo(
            f"{spec.name}{default}: {spec.feature_dim}-d, {spec.input_size}px, "
            f"preprocessing {spec.preprocessing}; weights: {spec.weight_source}"
        )


# --- heads: fit-head, predict, demo -------------------------------------------------

if TYPE_CHECKING:  # the real imports stay inside the commands, so --help stays fast
    from tlfeat.fit import FitSummary, HeadResult


def _echo_head(result: HeadResult) -> None:
    """One line per fitted head as it finishes, then its search trials and warnings."""
    scores = "  ".join(f"{split} {s['accuracy']:.3f}" for split, s in result.scores.items())
    params = ", ".join(f"{k}={v}" for k, v in result.params.items())
    typer.echo(f"{result.head:<10} {params:<12} acc: {scores}  (fit {result.fit_seconds:.1f} s)")
    if result.search:
        label = next(iter(result.params))
        trials = ", ".join(f"{t[label]}: {t['val_accuracy']:.3f}" for t in result.search)
        typer.echo(f"{'':<10} val accuracy by {label}: {trials}; {result.search_seconds:.1f} s in all")
    for note in result.notes:
        typer.echo(f"{'':<10} note: {note}")


def _echo_fit_summary(summary: FitSummary) -> None:
    typer.echo("")
    typer.echo(summary.table)
    names = ", ".join(r.head for r in summary.results)
    typer.echo(
        f"wrote {summary.out}/: <head>.joblib (+ .json metadata, .metrics.json, .confusion.png) for {names}; "
        f"summary.md, summary.csv"
    )


@app.command("fit-head")
@user_errors
def fit_head(
    caches: list[Path] = typer.Argument(..., help="A cache, or several caches over the same images to fuse column-wise (e.g. resnet101 + vgg16)."),
    head: str = typer.Option("logreg", "--head", help="logreg, linear-svm, knn, mlp, report, or all (one comparison table)."),
    search: bool = typer.Option(False, "--search", help="Choose on the val split: C (logreg, linear-svm), k (knn), alpha (mlp), epochs (report)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder. Default: heads/<cache stem(s)>/ beside the first cache."),
    seed: int = typer.Option(0, "--seed", help="Seed of the heads' own randomness (initialisation, shuffling)."),
    streaming: bool = typer.Option(False, "--streaming", help="For caches larger than memory: logreg or linear-svm by SGD over chunks of rows (one cache, no --search)."),
    chunk_rows: int = typer.Option(4096, "--chunk-rows", help="With --streaming: rows read at a time (bounds memory)."),
    passes: int = typer.Option(10, "--passes", help="With --streaming: passes over the train rows, chunks shuffled each pass."),
) -> None:
    """Fit classification heads on cached features: fit on train, select on val, score train/val/test."""
    if streaming:
        from tlfeat.streaming import fit_streaming

        if len(caches) != 1 or search:
            raise TlfeatError("--streaming fits one cache, without --search")
        summary = fit_streaming(caches[0], head=head, out=out, chunk_rows=chunk_rows, passes=passes, seed=seed)
        _echo_head(summary.results[0])
    else:
        from tlfeat.fit import fit_heads

        summary = fit_heads(caches, head=head, search=search, out=out, seed=seed, on_result=_echo_head)
    _echo_fit_summary(summary)


@app.command()
@user_errors
def predict(
    model: Path = typer.Argument(..., help="A head's .joblib written by fit-head (its .json metadata beside it), or a fine-tune run folder / its model.keras."),
    images: list[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively for images)."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Also write the predictions (and skipped files) to this CSV."),
    top: int = typer.Option(1, "--top", help="Show the K most probable classes per image."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per forward pass."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Classify images with a fitted head (embedding them exactly as its training cache was) or a fine-tuned model.

    Only load heads you made or trust: a .joblib is a pickle, and loading it runs code.
    """
    from tlfeat.predict import predict_images, write_predictions_csv

    result = predict_images(model, images, top=top, batch_size=batch_size, progress=not quiet)
    for p in result.predictions:
        typer.echo(f"{p.path}\t" + "\t".join(f"{name} {prob:.3f}" for name, prob in p.top))
    for path, reason in result.skipped:
        typer.echo(f"skipped {path}: {reason}", err=True)
    if csv is not None:
        write_predictions_csv(csv, result, top)
        typer.echo(f"wrote {csv}", err=True)
    if not result.predictions:
        raise TlfeatError(f"none of the {len(result.skipped)} files could be read as an image")


@app.command()
@user_errors
def evaluate(
    model: Path = typer.Argument(..., help="A head's .joblib written by fit-head."),
    caches: list[Path] = typer.Argument(..., help="Labelled cache(s) extracted with the head's settings; a fused head takes one per backbone, in its order."),
    split: Optional[str] = typer.Option(None, "--split", help="Score only this split (train, val or test). Default: every split present."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write per-class scores and confusion matrices to this JSON file."),
) -> None:
    """Score a fitted head on cached features, e.g. a new labelled set extracted with the same backbone.

    Refuses a cache whose class list, backbone, weights, image size or preprocessing
    differ from what the head was fitted on.
    """
    from tlfeat.predict import evaluate_on_caches
    from tlfeat.reports import markdown_table, write_json

    result = evaluate_on_caches(model, caches, split=split)
    rows = [[name, m["n"], m["accuracy"], m["macro_f1"]] for name, m in result.metrics.items()]
    typer.echo(markdown_table(["split", "images", "accuracy", "macro-F1"], rows), nl=False)
    if json_out is not None:
        write_json(json_out, {"model": str(model), "caches": [str(c) for c in caches], "classes": result.meta["classes"],
                              "splits": result.metrics})
        typer.echo(f"wrote {json_out}")


@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("cache"), "--out", "-o", help="Folder for the digits dataset, its cache and the heads."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Offline end-to-end demo on scikit-learn's 1,797 handwritten digits: write PNGs, extract, fit every head."""
    from tlfeat.demo import run_demo

    result = run_demo(out, progress=not quiet, on_result=_echo_head)
    extracted = result.extract
    typer.echo(
        f"dataset {result.dataset}/ ({result.n_written} PNGs written); cache {extracted.out}: "
        f"{extracted.n_images} images, computed {extracted.n_computed}, reused {extracted.n_reused}"
    )
    _echo_fit_summary(result.fit)
    example = next(iter(sorted((result.dataset / "3").glob("*.png"))), result.dataset)
    typer.echo(f"demo took {result.seconds:.0f} s; try: python cli.py predict {result.fit.out / 'logreg.joblib'} {example}")


# --- fine-tuning and comparison ---------------------------------------------------------


@app.command()
@user_errors
def finetune(
    data: Path = typer.Argument(..., help="Dataset folder, as for extract (same scan and split for the same --seed/--split)."),
    backbone: str = typer.Option("efficientnet_lite0", "--backbone", "-b", help="efficientnet_lite0, resnet101 or vgg16."),
    weights: str = typer.Option("imagenet", "--weights", "-w", help="imagenet, none (random, for smoke tests) or a Keras weights file."),
    epochs1: int = typer.Option(20, "--epochs1", help="Stage 1 epochs: head only, base frozen."),
    epochs2: int = typer.Option(30, "--epochs2", help="Stage 2 epochs: top layers of the base unfrozen."),
    unfreeze_top: Optional[int] = typer.Option(None, "--unfreeze-top", help="Stage 2 trains the last K layers of the base. Default: the study's 146 (resnet101), 10 (vgg16); 47 for efficientnet_lite0 (from block6a). 0 skips stage 2."),
    unfreeze_all: bool = typer.Option(False, "--unfreeze-all", help="Stage 2 trains the whole base."),
    lr1: float = typer.Option(1e-3, "--lr1", help="Stage 1 RMSprop learning rate."),
    lr2: float = typer.Option(1e-5, "--lr2", help="Stage 2 RMSprop learning rate."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per training step."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Square input size. Default: the backbone's (224)."),
    augment: bool = typer.Option(False, "--augment", help="Training-only random crop/zoom and horizontal flip, seeded."),
    patience: int = typer.Option(10, "--patience", help="Stop a stage after this many epochs without a lower val loss; 0: never."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split, the head's initialisation, shuffling and augmentation."),
    split: str = typer.Option("56.25,18.75,25", "--split", help="train,val,test shares for a flat dataset, as for extract."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder. Default: runs/<dataset>-<backbone>-top<K>-<timestamp>/"),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out (default: the newest matching one in runs/)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-step progress bar."),
) -> None:
    """Fine-tune a backbone with the study's head: train the head on the frozen base, then unfreeze the top layers.

    BatchNorm layers stay in inference mode throughout (pretrained statistics
    kept). Every epoch is checkpointed: after Ctrl-C or a kill, rerun with
    --resume (and the same options) to continue.
    """
    from tlfeat.finetune import finetune as run_finetune

    result = run_finetune(
        data, backbone=backbone, weights=weights, epochs1=epochs1, epochs2=epochs2, unfreeze_top=unfreeze_top,
        unfreeze_all=unfreeze_all, lr1=lr1, lr2=lr2, batch_size=batch_size, image_size=image_size, augment=augment,
        seed=seed, ratios=_parse_ratios(split), patience=patience, out=out, resume=resume, progress=not quiet,
        log=typer.echo,
    )
    summary = result.summary
    if result.already_finished:
        typer.echo(f"{result.out}: this run finished already; nothing to resume")
    scores = "  ".join(
        f"{name} acc {s['accuracy']:.3f} macro-F1 {s['macro_f1']:.3f}" for name, s in summary["scores"].items()
    )
    epochs = ", ".join(f"stage {k} {v['epochs_run']}/{v['epochs_planned']} epochs" for k, v in summary["stages"].items())
    typer.echo(f"{summary['backbone']} {summary['method']}: {scores}")
    typer.echo(f"{epochs}; {summary['seconds']:.1f} s of training; {len(result.skipped)} unreadable images skipped")
    typer.echo(
        f"wrote {result.out}/: model.keras, summary.json, metrics.json, history.csv/.json, training.png, confusion.png"
    )


@app.command()
@user_errors
def compare(
    inputs: list[Path] = typer.Argument(..., help="fit-head models (.joblib or their .json), fine-tune runs (folder, model.keras or summary.json), or folders searched recursively for both."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Also write the table as CSV."),
    png: Optional[Path] = typer.Option(None, "--png", help="Also draw a grouped bar chart of the accuracies and macro-F1."),
) -> None:
    """One table across frozen-feature heads and fine-tuned runs: method, trainable parameters, accuracies, seconds."""
    from tlfeat.compare import compare as run_compare

    result = run_compare(inputs, csv=csv, png=png)
    typer.echo(result.table)
    for path in (csv, png):
        if path is not None:
            typer.echo(f"wrote {path}")


if __name__ == "__main__":
    app()
