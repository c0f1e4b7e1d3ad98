"""CLI: finetune, compare."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tlfeat.backbones import DEFAULT_BACKBONE, list_backbones
from tlfeat.cli.common import DEFAULT_SPLIT, app, parse_ratios, user_errors

UNFREEZE_DEFAULTS = ", ".join(f"{b.unfreeze_top} ({b.name})" for b in list_backbones() if b.unfreeze_top is not None)
BACKBONE_NAMES = ", ".join(b.name for b in list_backbones())


@app.command()
@user_errors
def finetune(
    data: Path = typer.Argument(..., help="Dataset folder, as for extract (same scan and split for the same --seed/--split)."),
    backbone: str = typer.Option(DEFAULT_BACKBONE, "--backbone", "-b", help=f"One of: {BACKBONE_NAMES}."),
    weights: str = typer.Option("imagenet", "--weights", "-w", help="imagenet, none (random, for smoke tests) or a Keras weights file."),
    epochs1: int = typer.Option(20, "--epochs1", help="Stage 1 epochs: head only, base frozen."),
    epochs2: int = typer.Option(30, "--epochs2", help="Stage 2 epochs: top layers of the base unfrozen."),
    unfreeze_top: Optional[int] = typer.Option(None, "--unfreeze-top", help=f"Stage 2 trains the last K layers of the base. Default: {UNFREEZE_DEFAULTS}. 0 skips stage 2."),
    unfreeze_all: bool = typer.Option(False, "--unfreeze-all", help="Stage 2 trains the whole base."),
    lr1: float = typer.Option(1e-3, "--lr1", help="Stage 1 RMSprop learning rate."),
    lr2: float = typer.Option(1e-5, "--lr2", help="Stage 2 RMSprop learning rate."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per training step."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Square input size, 32 to 1024. Default: the backbone's native size (`tlfeat backbones` lists them: 224 for most, up to 600)."),
    augment: bool = typer.Option(False, "--augment", help="Training-only random crop/zoom and horizontal flip, seeded."),
    patience: int = typer.Option(10, "--patience", help="Stop a stage after this many epochs without a lower val loss; 0: never."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split, the head's initialisation, shuffling and augmentation."),
    split: str = typer.Option(DEFAULT_SPLIT, "--split", help="train,val,test shares for a flat dataset, as for extract."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder. Default: a new one in runs/, named <dataset>-<backbone>-top<K>-<timestamp>."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out (default: the newest matching one in runs/)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-step progress bar."),
) -> None:
    """Fine-tune a backbone with the study's head: train the head on the frozen base, then unfreeze the top layers.

    BatchNorm layers stay in inference mode throughout (pretrained statistics
    kept). Every epoch is checkpointed: after Ctrl-C or a kill, rerun with
    --resume (and the same options) to continue.
    """
    from tlfeat.finetuning import finetune as run_finetune

    result = run_finetune(
        data, backbone=backbone, weights=weights, epochs1=epochs1, epochs2=epochs2, unfreeze_top=unfreeze_top,
        unfreeze_all=unfreeze_all, lr1=lr1, lr2=lr2, batch_size=batch_size, image_size=image_size, augment=augment,
        seed=seed, ratios=parse_ratios(split), patience=patience, out=out, resume=resume, progress=not quiet,
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
    if not result.already_finished:  # nothing was written then
        typer.echo(
            f"wrote {result.out}/: model.keras, summary.json, metrics.json, history.csv/.json, training.png, "
            "confusion.png"
        )


@app.command()
@user_errors
def compare(
    inputs: list[Path] = typer.Argument(..., help="fit-head heads (.skops), fine-tune runs (folder, model.keras or summary.json), or folders searched recursively for both."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Also write the table as CSV."),
    png: Optional[Path] = typer.Option(None, "--png", help="Also draw a grouped bar chart of the accuracies and macro-F1."),
) -> None:
    """One table across frozen-feature heads and fine-tuned runs: method, trainable parameters, accuracies, seconds."""
    from tlfeat.apps.compare import compare as run_compare

    result = run_compare(inputs, csv=csv, png=png)
    typer.echo(result.table)
    for note in result.notes:
        typer.echo(f"note: {note}")
    for path in (csv, png):
        if path is not None:
            typer.echo(f"wrote {path}")
