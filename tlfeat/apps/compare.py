"""compare: one table across fit-head models and fine-tune runs, from the files they wrote.

A fit-head model is read from the metadata inside its ``.skops`` file (or a
tlfeat 0.1 head's ``.json``), a fine-tune run from its ``summary.json``; no
model is loaded, so comparing is fast and runs no code from the files. Folders
are searched recursively for both. A run that has not finished (a state.json, no
summary.json) has no scores: named, it is an error that says how to resume it;
found in a folder, it is left out with a note naming it.

Scores only compare on the same images in the same splits: rows are grouped by
their dataset (folder, split seed and shares, class list, images per split) and
ranked by val accuracy within it only; the bar chart draws one panel per dataset,
its axis zoomed to the scores shown. A head also records a digest of which images
sit in which split (the one fit-head's folders agree on), a fine-tune run its own
digest of them: two heads (or two runs) on other images with the same counts are
kept apart by it. A head and a run cannot be matched by digest, so they are matched
by class list and counts, and a note says so. Datasets whose labels would read
alike are told apart by folder path, size or digest.

How sure each test score is: its 95% Wilson interval, from the number of test
images scored. Whether two differ: each head and run keeps the class it predicted
for each test image (`tlfeat.reports.ImageOutcomes`), so each model is paired with
#1 of its dataset on the test images both scored (matched by path and byte size)
and McNemar's exact test gives the p-value of their difference.

Trainable parameters of a head are counted from its shape (feature dim D,
classes C) and the fitted parts that learn: linear maps, hidden layers and the
linear SVM's calibration sigmoids. Scaling statistics are not counted, as the
frozen BatchNorm statistics of a fine-tuned base are not; k-NN learns nothing
(n/a). Seconds are training seconds: a head's fit (all fits of its --search),
a run's epochs (validation included), never the feature extraction before fit-head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tlfeat.apps.result_files import find_results
from tlfeat.errors import TlfeatError, some_of
from tlfeat.fileio import check_output_path, path_list, path_value
from tlfeat.data.scan import SPLITS
from tlfeat.finetuning.runs import read_run_summary, read_run_test_outcomes, unfinished_run
from tlfeat.heads.folder import DAMAGED_HEAD_ADVICE
from tlfeat.heads.registry import head_trainable_params
from tlfeat.heads.store import read_metadata, read_test_outcomes
from tlfeat.reports import (
    ImageOutcomes, PairedDifference, accuracy_interval, interval_text, markdown_table, paired_difference, save_png,
    write_csv,
)

HEADERS = (
    "dataset", "rank", "model", "backbone", "weights", "method", "trainable params",
    "train acc", "val acc", "test acc", "test 95% CI", "p vs #1", "test macro-F1", "train s",
)
# The CSV holds numbers to compute with: the interval's two ends, and the images each paired test counted.
CSV_HEADERS = (
    *HEADERS[:HEADERS.index("test 95% CI")], "test 95% CI low", "test 95% CI high", "p vs #1", "paired test images",
    *HEADERS[HEADERS.index("p vs #1") + 1:],
)
# Below it, a model's test accuracy differs from #1's by more than chance among the test images explains.
SIGNIFICANCE = 0.05


def dataset_label(root: str | None, seed: object, ratios: object, classes: object, counts: object) -> tuple[tuple, str]:
    """(grouping key, label) of a dataset as split: its folder, split seed and shares, class list and images
    per split. Adding images to a folder, or a class, changes the key: such scores do not compare."""
    shares = "/".join(f"{100 * float(r):g}" for r in ratios) if isinstance(ratios, (list, tuple)) else "?"
    per_split = tuple((s, int(counts[s])) for s in SPLITS if s in counts) if isinstance(counts, dict) else ()
    key = (str(root), str(seed), shares, tuple(classes) if isinstance(classes, list) else (), per_split)
    return key, f"{Path(str(root)).name or root} (seed {seed}, split {shares})"


@dataclass
class Row:
    dataset: tuple[tuple, str]  # (grouping key, label): rows rank only against rows of the same key
    name: str
    backbone: str
    weights: str
    method: str
    trainable_params: int | None
    scores: dict[str, dict]  # split -> {"n", "accuracy", "macro_f1"}
    seconds: float
    path: Path
    images: tuple[str, str | None] = ("head", None)  # ("head", rows digest) or ("run", dataset fingerprint)
    versus_first: PairedDifference | None = None  # against #1 of its dataset, on the test images both scored

    def accuracy(self, split: str) -> float | None:
        return self.scores[split]["accuracy"] if split in self.scores else None

    def macro_f1(self) -> float | None:
        return self.scores["test"]["macro_f1"] if "test" in self.scores else None

    def test_interval(self) -> tuple[float, float] | None:
        """The 95% interval of the test accuracy, from the number of test images scored."""
        test = self.scores.get("test")
        return accuracy_interval(test["accuracy"], int(test["n"])) if test and test.get("n") else None

    def test_outcomes(self) -> ImageOutcomes | None:
        """The outcome on each test image scored; None when the head or run was made before they were kept."""
        return read_test_outcomes(self.path) if self.images[0] == "head" else read_run_test_outcomes(self.path)

    def cells(self, rank: int | None) -> list:
        """The row as the CSV holds it (`CSV_HEADERS`)."""
        low, high = self.test_interval() or (None, None)
        paired = self.versus_first
        return [
            self.dataset[1], "-" if rank is None else rank, self.name, self.backbone, self.weights, self.method, self.trainable_params,
            *(self.accuracy(s) for s in SPLITS), low, high, paired and paired.p_value, paired and paired.images,
            self.macro_f1(), round(self.seconds, 2),
        ]

    def shown_cells(self, rank: int | None) -> list:
        """The row as the table shows it (`HEADERS`): the interval in one cell, p to 3 digits, counts with commas."""
        cells = self.cells(rank)
        low = CSV_HEADERS.index("test 95% CI low")
        interval = "" if cells[low] is None else interval_text(cells[low:low + 2])
        cells[low:low + 4] = [interval, _p_text(self, rank)]
        params, seconds = HEADERS.index("trainable params"), HEADERS.index("train s")
        cells[params] = "n/a" if cells[params] is None else f"{cells[params]:,}"
        cells[seconds] = f"{cells[seconds]:.2f}"
        return cells


@dataclass
class CompareResult:
    """The comparison: one row per head or run (grouped by dataset, ranked by val accuracy; each row's
    `test_interval()` and `versus_first`, its paired test against #1), `table` in markdown, and `notes` on
    rows left unranked, on the paired tests, on heads and runs matched by counts, and on unfinished runs left out."""

    rows: list[Row]
    table: str  # markdown
    notes: list[str]  # rows left unranked, and why; heads and runs matched by counts; unfinished runs left out

    def __repr__(self) -> str:  # every row's dataset key and scores fill a notebook cell; print(.table) shows them
        return (f"CompareResult({len(self.rows)} rows ({some_of([row.name for row in self.rows], 5)}), .table, "
                f"{len(self.notes)} notes)")


def _weights_label(weights: str | None) -> str:
    if not weights:
        return "?"
    return weights if weights in ("imagenet", "none") else Path(weights).name


def _backbone_label(backbone: object, image_size: object) -> str:
    """"efficientnet_lite0@288": features of one backbone at two image sizes are different features."""
    return f"{backbone}@{image_size}" if image_size else str(backbone)


def head_row(model_path: Path) -> Row:
    try:
        meta = read_metadata(model_path, whole=True)
    except TlfeatError as exc:  # one damaged file must not leave the user stuck on a whole tree of results
        raise TlfeatError(f"{exc}; {DAMAGED_HEAD_ADVICE}, or compare paths that leave it out") from None
    sources = meta.get("sources") or []
    searched = meta.get("search_seconds")
    first = sources[0] if sources else {}
    rows = meta.get("rows") or {}  # a tlfeat 0.1 head recorded none
    return Row(
        dataset=dataset_label(first.get("dataset_root"), first.get("seed"), first.get("split_ratios"),
                              meta.get("classes"), rows.get("counts")),
        name=f"{model_path.parent.name}/{meta['head']}",
        backbone="+".join(_backbone_label(s.get("backbone"), s.get("input_size")) for s in sources),
        weights="+".join(_weights_label(s.get("weights_source") or s.get("weights")) for s in sources),
        method=f"frozen + {meta['head']}",
        trainable_params=head_trainable_params(meta["head"], int(meta["feature_dim"]), len(meta["classes"])),
        scores=meta.get("scores", {}),
        seconds=float(searched if searched is not None else meta.get("fit_seconds", 0.0)),
        path=model_path,
        images=("head", rows.get("digest")),
    )


def run_row(run_dir: Path) -> Row:
    summary = read_run_summary(run_dir)
    return Row(
        dataset=dataset_label(summary.get("dataset_root"), summary.get("seed"), summary.get("split_ratios"),
                              summary.get("classes"), summary.get("split_counts")),
        name=run_dir.name,
        backbone=_backbone_label(summary["backbone"], summary.get("image_size")),
        weights=_weights_label(summary.get("weights")),
        method=summary["method"],
        trainable_params=summary.get("trainable_params"),
        scores=summary.get("scores", {}),
        seconds=float(summary.get("seconds", 0.0)),
        path=run_dir,
        images=("run", summary.get("dataset_fingerprint")),
    )


def score_limits(values: Sequence[float | None]) -> tuple[float, float]:
    """A score axis zoomed to `values`: 0.90 and 0.93 must look different, with headroom for the legend."""
    shown = [v for v in values if v is not None]
    if not shown:
        return 0.0, 1.0
    low, high = min(shown), max(shown)
    pad = max(0.02, 0.15 * (high - low))
    return max(0.0, low - pad), min(1.0, high) + 3 * pad


def plot_bars(rows: Sequence[Row], path: Path) -> None:
    """Grouped bars per model, one panel per dataset: train / val / test accuracy (with its 95% interval) and
    test macro-F1."""
    import numpy as np
    from matplotlib.figure import Figure

    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.dataset[0], []).append(row)
    widest = max(len(g) for g in groups.values())
    fig = Figure(figsize=(max(6.0, 1.1 * widest + 2), 4.8 * len(groups)))
    for panel, members in enumerate(groups.values()):
        ax = fig.add_subplot(len(groups), 1, panel + 1)
        series = [(f"{s} acc", [r.accuracy(s) for r in members]) for s in SPLITS]
        series.append(("test macro-F1", [r.macro_f1() for r in members]))
        x = np.arange(len(members))
        width = 0.8 / len(series)
        intervals = [r.test_interval() or (np.nan, np.nan) for r in members]
        for i, (label, values) in enumerate(series):
            heights = [np.nan if v is None else v for v in values]  # a split a model lacks leaves a gap
            # the test accuracy's 95% interval as a whisker: bars closer than it do not rank models
            whiskers = (np.abs(np.array(intervals).T - np.array(heights, dtype=float)) if label == "test acc"
                        else None)
            ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=label, yerr=whiskers, capsize=2)
        crowded = len(members) > 4 or sum(len(r.name) for r in members) > 60  # labels would run into each other
        ax.set_xticks(
            x, labels=[f"{r.name}\n{r.method}" for r in members], rotation=30 if crowded else 0,
            ha="right" if crowded else "center", fontsize=8,
        )
        # the whiskers too: an axis zoomed to the bars alone cut them short, and a cut whisker reads as a surer score
        whisker_ends = [v for interval in intervals for v in interval if not np.isnan(v)]
        ax.set_ylim(*score_limits([v for _, values in series for v in values] + whisker_ends))
        ax.set_ylabel("score")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper center", ncol=len(series), fontsize=8)
        ax.set_title(f"{members[0].dataset[1]}: frozen-feature heads vs fine-tuning", fontsize=10)
    save_png(fig, path)


def _by_key(rows: list[Row]) -> dict[tuple, list[Row]]:
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.dataset[0], []).append(row)
    return groups


def _separate_image_sets(rows: list[Row]) -> list[tuple]:
    """Split a dataset whose heads (or runs) record different image digests: same counts, other images.
    Returns the keys of the datasets that mix heads and runs, matched by class list and counts only."""
    mixed = []
    for key, members in _by_key(rows).items():
        digests = {row.images for row in members}
        if len(digests) > len({kind for kind, _ in digests}):
            for row in members:
                row.dataset = (key + row.images, row.dataset[1])
        elif len(digests) > 1:
            mixed.append(key)
    return mixed


def _distinct_labels(rows: list[Row]) -> list[Row]:
    """Datasets whose labels read alike get what tells them apart: the whole folder path, the class and image
    counts, or a short digest of their images. Two datasets must never read as one."""
    keys: dict[str, set] = {}
    for row in rows:
        keys.setdefault(row.dataset[1], set()).add(row.dataset[0])
    for row in rows:
        alike = keys[row.dataset[1]]
        if len(alike) == 1:
            continue
        key = row.dataset[0]
        root, seed, shares, classes, counts = key[:5]
        name = root if len({k[0] for k in alike}) > 1 else Path(root).name or root
        label = f"{name} (seed {seed}, split {shares}"
        if len({k[3:5] for k in alike}) > 1:
            label += f"; {len(classes)} classes, {sum(n for _, n in counts):,} images"
        if len({k[5:] for k in alike}) > 1 and key[5:]:
            label += f"; images {str(key[6])[:8]}"
        row.dataset = (key, label + ")")
    return rows


def _why_no_val(row: Row) -> str:
    """Why a row has no val score: its dataset has no val images, or a head was fitted on them too, or a run's
    were all left out of its score (copies of its training images, or unreadable)."""
    if not dict(row.dataset[0][4]).get("val"):
        return "no val images"
    if row.images[0] == "head":
        return "fitted on val too"
    return "none of its val images left to score; see its summary.json notes"


def _pair_with_first(rows: list[Row], ranks: dict[int, int | None]) -> list[str]:
    """Set `versus_first` of every row with a test score against #1 of its dataset, from the outcomes both
    recorded per test image; the notes say what the p-values are and which rows have none, and why."""
    notes = []
    for members in _by_key(rows).values():
        first = next((row for row in members if ranks[id(row)] == 1), None)
        others = [row for row in members if row is not first and "test" in row.scores]
        if not others or len(members) == 1:  # a lone row's own "not ranked" note says why it has no #1
            continue
        label = others[0].dataset[1]
        if first is None or "test" not in first.scores:  # the others' n/a must not go unexplained
            why = "no model is ranked (none has a val score)" if first is None else f"#1 ({first.name}) has no test score"
            notes.append(f"{label}: no p vs #1, as {why}")
            continue
        reference, why = _read_outcomes(first)
        if reference is None:
            notes.append(f"{label}: no p vs #1, as #1 ({first.name}) has no per-image test outcomes ({why})")
            continue
        unpaired = []
        for row in others:
            outcomes, why = _read_outcomes(row)
            if outcomes is None and why == _MADE_BEFORE:  # said once for them all
                unpaired.append(row.name)
            elif outcomes is None:
                notes.append(f"{row.name}: no p vs #1, {why}")
            else:
                row.versus_first = paired_difference(reference, outcomes)
                if not row.versus_first.images:
                    row.versus_first = None
                    notes.append(f"{row.name}: no p vs #1, no test image in common with #1 ({first.name})")
        if unpaired:
            notes.append(f"{some_of(unpaired, 3)}: no p vs #1, no per-image test outcomes recorded ({_MADE_BEFORE})")
        counts = sorted(row.versus_first.images for row in others if row.versus_first is not None)
        if counts:
            images = f"{counts[0]:,}" if counts[0] == counts[-1] else f"{counts[0]:,}-{counts[-1]:,}"
            notes.append(
                f"{label}: p vs #1 is McNemar's exact test of each model against #1 ({first.name}) on the test images "
                f"both scored ({images}); below {SIGNIFICANCE:g}, their test accuracies differ by more than chance "
                "among these images explains (one test per row, not corrected for the number of rows)"
            )
    return notes


# Why a head or run has no per-image test outcomes to pair on.
_MADE_BEFORE = "made before tlfeat kept them; fit the head or fine-tune the run again for one"


def _read_outcomes(row: Row) -> tuple[ImageOutcomes | None, str | None]:
    """A row's per-image test outcomes, or None and why there are none: an unreadable file, or `_MADE_BEFORE`."""
    try:
        outcomes = row.test_outcomes()
    except TlfeatError as exc:
        return None, str(exc)
    return outcomes, None if outcomes is not None else _MADE_BEFORE


def _p_text(row: Row, rank: int | None) -> str:
    if rank == 1:
        return "-"
    if row.versus_first is None:
        return "n/a" if "test" in row.scores else ""
    p = row.versus_first.p_value
    return "<0.001" if p < 0.001 else f"{p:.3g}"  # 3 digits: 0.0498 must not read as 0.050


def compare(inputs: str | Path | Sequence[str | Path], csv: str | Path | None = None, png: str | Path | None = None) -> CompareResult:
    """Build the comparison table (grouped by dataset, ranked by val accuracy within each) and the optional CSV and PNG.

    inputs: fit-head head files (.skops), fine-tune runs (folder, model.keras or summary.json), or folders
    searched recursively for both. csv, png: files to write the table and a bar chart to. No model is loaded.
    """
    for path, parameter in ((csv, "csv"), (png, "png")):
        if path is not None:
            check_output_path(path_value(parameter, path), parameter=parameter, suffix=f".{parameter}")
    if csv is not None and png is not None and Path(csv).resolve() == Path(png).resolve():
        raise TlfeatError(f"{csv}: given as both `csv` and `png`; the chart would replace the table")
    inputs = path_list(inputs, "inputs", "fit-head models, fine-tune runs or folders of them")
    results = find_results(inputs)
    unfinished = [f"{path}: left out, {unfinished_run(path)}" for kind, path in results if kind == "unfinished"]
    results = [(kind, path) for kind, path in results if kind != "unfinished"]
    if not results:
        where = ", ".join(str(p) for p in inputs)
        raise TlfeatError(f"{where}: no fit-head models or {'finished ' if unfinished else ''}fine-tune runs found"
                          + "".join(f"; {note}" for note in unfinished))
    rows = [head_row(path) if kind == "head" else run_row(path) for kind, path in results]
    mixed = _separate_image_sets(rows)
    rows = _distinct_labels(rows)
    rows.sort(key=lambda r: (r.dataset[1], r.dataset[0], r.accuracy("val") is None, -(r.accuracy("val") or 0.0), r.name))
    ranks: dict[int, int | None] = {}  # id(row) -> rank within its dataset
    per_dataset: dict[tuple, int] = {}
    notes = [f"{_by_key(rows)[key][0].dataset[1]}: heads and fine-tune runs matched by folder, split, class list and "
             "images per split (they record different digests of their images)" for key in mixed]
    for row in rows:
        if row.accuracy("val") is None:  # e.g. a recipe head, refitted on train+val: no held-out val score
            ranks[id(row)] = None
            cv = row.scores.get("cv", {}).get("accuracy")
            notes.append(f"{row.name}: not ranked, no val score ({_why_no_val(row)})"
                         + (f"; its cross-validated accuracy over train+val is {cv:.4f}" if cv is not None else ""))
            continue
        per_dataset[row.dataset[0]] = ranks[id(row)] = per_dataset.get(row.dataset[0], 0) + 1
    notes += _pair_with_first(rows, ranks)
    notes += unfinished
    table = markdown_table(HEADERS, [row.shown_cells(ranks[id(row)]) for row in rows])
    if csv is not None:
        write_csv(csv, CSV_HEADERS, [row.cells(ranks[id(row)]) for row in rows])
    if png is not None:
        plot_bars(rows, png)
    return CompareResult(rows, table, notes)
