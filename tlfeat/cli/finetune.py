"""CLI: finetune, compare."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tlfeat.backbones import list_backbones
from tlfeat.cli.common import DEFAULT_SPLIT, app, parse_ratios, user_errors
from tlfeat.finetuning.options import DEFAULT_OPTIONS as DEFAULTS

UNFREEZE_DEFAULTS = ", ".join(f"{b.unfreeze_top} ({b.name})" for b in list_backbones() if b.unfreeze_top is not None)
BACKBONE_NAMES = ", ".join(b.name for b in list_backbones())


@app.command()
@user_errors
def finetune(
    data: Path = typer.Argument(..., help="Dataset folder, as for extract (same scan and split for the same --seed/--split)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help=f"Default {DEFAULTS['backbone']}. One of: {BACKBONE_NAMES}."),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="imagenet (the default), none (random, for smoke tests) or a Keras weights file."),
    epochs1: Optional[int] = typer.Option(None, "--epochs1", help=f"Stage 1 epochs: head only, base frozen. Default {DEFAULTS['epochs1']}."),
    epochs2: Optional[int] = typer.Option(None, "--epochs2", help=f"Stage 2 epochs: top layers of the base unfrozen. Default {DEFAULTS['epochs2']}."),
    unfreeze_top: Optional[int] = typer.Option(None, "--unfreeze-top", help=f"Stage 2 trains the last K layers of the base. Default: {UNFREEZE_DEFAULTS}. 0 skips stage 2."),
    unfreeze_all: bool = typer.Option(False, "--unfreeze-all", help="Stage 2 trains the whole base."),
    lr1: Optional[float] = typer.Option(None, "--lr1", help=f"Stage 1 RMSprop learning rate. Default {DEFAULTS['lr1']:g}."),
    lr2: Optional[float] = typer.Option(None, "--lr2", help=f"Stage 2 RMSprop learning rate. Default {DEFAULTS['lr2']:g}."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=f"Images per training step. Default {DEFAULTS['batch_size']}."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Square input size, 32 to 1024. Default: the backbone's native size (`tlfeat backbones` lists them: 224 for most, up to 600)."),
    augment: Optional[bool] = typer.Option(None, "--augment", help="Training-only random crop/zoom and horizontal flip, seeded. Default: off (on --resume: as the run was started)."),
    patience: Optional[int] = typer.Option(None, "--patience", help=f"Stop a stage after this many epochs without a lower val loss; 0: never. Default {DEFAULTS['patience']}."),
    seed: Optional[int] = typer.Option(None, "--seed", help=f"Seed of the split, the head's initialisation, shuffling and augmentation. Default {DEFAULTS['seed']}."),
    split: Optional[str] = typer.Option(None, "--split", help=f"train,val,test shares for a flat dataset, as for extract. Default {DEFAULT_SPLIT}."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder. Default: a new one in runs/, named <dataset>-<backbone>-top<K>-<timestamp>."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out (default: the newest matching one in runs/) with its own options; give one again only to extend the run (--epochs1, --epochs2, --patience)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No per-step progress bar."),
) -> None:
    """Fine-tune a backbone with the study's head: train the head on the frozen base, then unfreeze the top layers.

    BatchNorm layers stay in inference mode throughout (pretrained statistics
    kept). Every epoch is checkpointed: after Ctrl-C or a kill,
    `--out RUN --resume` continues the run with its own options.
    """
    from tlfeat.finetuning import finetune as run_finetune

    result = run_finetune(
        data, backbone=backbone, weights=weights, epochs1=epochs1, epochs2=epochs2, unfreeze_top=unfreeze_top,
        unfreeze_all=unfreeze_all, lr1=lr1, lr2=lr2, batch_size=batch_size, image_size=image_size, augment=augment,
        seed=seed, ratios=None if split is None else parse_ratios(split), patience=patience, out=out, resume=resume,
        progress=not quiet, log=typer.echo,
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
    png: Optional[Path] = typer.Option(None, "--png", help="Also draw a grouped bar chart of the accuracies (test with its 95% interval) and macro-F1."),
) -> None:
    """One table across frozen-feature heads and fine-tuned runs: method, trainable parameters, accuracies, seconds.

    Rows are grouped by dataset and ranked by val accuracy within it. `test 95%
    CI` is the test accuracy's interval; `p vs #1` is McNemar's exact test of a
    model against its dataset's #1 on the test images both scored: below 0.05,
    their test accuracies differ by more than chance explains.
    """
    from tlfeat.apps.compare import compare as run_compare

    result = run_compare(inputs, csv=csv, png=png)
    typer.echo(result.table)
    for note in result.notes:
        typer.echo(f"note: {note}")
    for path in (csv, png):
        if path is not None:
            typer.echo(f"wrote {path}")
