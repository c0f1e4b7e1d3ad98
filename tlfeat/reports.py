"""Scores and report files: metrics JSON, confusion-matrix PNG, markdown and CSV tables; how sure a score is
(its 95% interval) and whether two models' scores differ (a paired test on their per-image test outcomes).

Every file is written atomically (temporary sibling, then rename), so an
interrupted run leaves the previous report or the new one, never half of one.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tlfeat.fileio import atomic_write_bytes, shown_path


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def split_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> dict:
    """Accuracy (with its 95% interval, `accuracy_interval`), macro-F1, per-class precision/recall/F1 and the
    confusion matrix of one split.

    Macro-F1 averages over the classes that occur in the split (as truth or as
    prediction), the scikit-learn default; per-class rows cover every class.
    """
    # imported here: the table and CSV writers of this module are imported by the CLI for --help
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    labels = np.arange(len(class_names))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    accuracy = float(accuracy_score(y_true, y_pred))
    return {
        "n": int(len(y_true)),
        "accuracy": accuracy,
        "accuracy_ci95": list(accuracy_interval(accuracy, len(y_true))),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], title: str, path: Path) -> None:
    """Row-normalised confusion matrix as a PNG (counts written in the cells when there is room)."""
    # The object API with an Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrix = np.asarray(matrix)
    n = len(class_names)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    side = min(24.0, max(4.5, 0.45 * n + 2.5))
    fig = Figure(figsize=(side, side * 0.9))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ax.set_xticks(range(n), labels=class_names, rotation=90 if n > 6 else 0)
    ax.set_yticks(range(n), labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    colour = "white" if share[i, j] > 0.5 else "black"
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8, color=colour)
    save_png(fig, path)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(headers)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buffer.getvalue()


def write_csv(path: Path, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    # A file name that is not UTF-8 (a str holding surrogate escapes) is written with \xNN escapes, not refused:
    # one pass over the whole text, not one per cell.
    atomic_write_bytes(path, shown_path(csv_text(headers, rows)).encode())


def save_png(fig: Any, path: Path, dpi: int = 100, tight: bool = True) -> None:
    """Render a matplotlib Figure to PNG (laid out tight unless `tight` is False), written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # A class or file name in a script the font lacks (CJK, an emoji) is drawn as boxes, and very long ones
        # leave tight_layout no room: the picture is still right, the warnings only fill the terminal.
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font")
        warnings.filterwarnings("ignore", message=r"Tight layout not applied")
        if tight:
            fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())


def plot_history(history: Sequence[dict], stage2_start: int | None, path: Path, title: str) -> None:
    """Training and validation accuracy and loss over all epochs, a dashed line where stage 2 starts."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [e["global_epoch"] for e in history]
    fig = Figure(figsize=(10, 4))
    for i, (metric, label) in enumerate((("accuracy", "accuracy"), ("loss", "loss"))):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.plot(epochs, [e[metric] for e in history], marker=".", label=f"train {label}")
        ax.plot(epochs, [e[f"val_{metric}"] for e in history], marker=".", label=f"val {label}")
        if stage2_start is not None:
            ax.axvline(stage2_start - 0.5, color="grey", linestyle="--", label="stage 2 starts")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    save_png(fig, path)


@dataclass(frozen=True)
class ImageOutcomes:
    """A model's result on each test image it scored: the image's identity (a 64-bit key of its path and byte size,
    `tlfeat.heads.rows`), its true class and the predicted one. Two models' outcomes pair on the images both scored,
    which is what tells a real difference in accuracy from chance (`paired_difference`)."""

    image: np.ndarray  # uint64
    label: np.ndarray  # class index
    predicted: np.ndarray  # class index

    def to_npz(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, image=self.image.astype(np.uint64), label=self.label.astype(np.int32),
                 predicted=self.predicted.astype(np.int32))
        return buffer.getvalue()

    @classmethod
    def from_npz(cls, payload: bytes) -> "ImageOutcomes":
        """Raises ValueError, KeyError or zipfile.BadZipFile for bytes that are not such a file."""
        try:
            with np.load(io.BytesIO(payload), allow_pickle=False) as arrays:
                outcomes = cls(arrays["image"], arrays["label"], arrays["predicted"])
        except EOFError:  # click takes an EOFError for end of input at a prompt: the CLI said only "aborted"
            raise ValueError("empty or cut short") from None
        if any(np.ndim(a) != 1 for a in (outcomes.image, outcomes.label, outcomes.predicted)):
            raise ValueError("its arrays are not one value per image")
        if not len(outcomes.image) == len(outcomes.label) == len(outcomes.predicted):
            raise ValueError("its arrays differ in length")
        if len(np.unique(outcomes.image)) < len(outcomes.image):  # pairing takes each image once
            raise ValueError("it lists an image twice")
        return outcomes


@dataclass(frozen=True)
class PairedDifference:
    """Two models on the test images both scored: how many each alone got right, and the exact McNemar p-value."""

    images: int  # test images both scored (with the same true class)
    only_first: int  # right by the first model, wrong by the second
    only_second: int
    p_value: float  # two-sided; below 0.05, the accuracies differ by more than chance among these images explains


def paired_difference(first: ImageOutcomes, second: ImageOutcomes) -> PairedDifference:
    """McNemar's exact test on the images both models scored: under "equally accurate", each image that one model
    alone got right is a fair coin's toss, so the p-value is a binomial tail of the disagreements."""
    from scipy.stats import binom

    _, i, j = np.intersect1d(first.image, second.image, assume_unique=True, return_indices=True)
    same = first.label[i] == second.label[j]  # a relabelled image is not the same test
    i, j = i[same], j[same]
    right_first, right_second = first.predicted[i] == first.label[i], second.predicted[j] == second.label[j]
    only_first, only_second = int(np.sum(right_first & ~right_second)), int(np.sum(right_second & ~right_first))
    tail = binom.cdf(min(only_first, only_second), only_first + only_second, 0.5)
    return PairedDifference(len(i), only_first, only_second, float(min(1.0, 2 * tail)))


def interval_text(interval: Sequence[float]) -> str:
    """An interval as the tables show it: "0.9037-0.9239"."""
    return f"{interval[0]:.4f}-{interval[1]:.4f}"


def accuracy_interval(accuracy: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of an accuracy measured on `n` images (it stays within 0-1 and holds for
    accuracies near 1, where the normal approximation does not)."""
    if n <= 0:
        return 0.0, 1.0
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * float(np.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)))
    return max(0.0, centre - half), min(1.0, centre + half)
