"""How sure a score is and whether two scores differ: the accuracy's 95% interval, the paired test on the outcomes
each head and run records per test image, and compare's columns built from them."""

from __future__ import annotations

import csv
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest
from typer.testing import CliRunner

import tlfeat
from cli import app
from conftest import gaussian_blobs, write_synthetic_cache
from tlfeat.heads.fit import fit_heads
from tlfeat.heads.rows import image_keys
from tlfeat.heads.store import TEST_MEMBER, load_head, read_metadata, read_test_outcomes
from tlfeat.reports import ImageOutcomes, accuracy_interval, paired_difference

runner = CliRunner()


def test_the_interval_is_wilsons() -> None:
    # Textbook values (Newcombe 1998, Statistics in Medicine 17:857, method 3: 81/263 -> 0.2553-0.3662).
    assert accuracy_interval(81 / 263, 263) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    assert accuracy_interval(0.0, 10) == pytest.approx((0.0, 0.2775), abs=5e-5)
    assert accuracy_interval(1.0, 10) == pytest.approx((0.7225, 1.0), abs=5e-5)  # never above 1, never empty
    assert accuracy_interval(0.5, 0) == (0.0, 1.0)  # no image: nothing is known
    low, high = accuracy_interval(0.9143, 2977)
    assert high - low == pytest.approx(0.0202, abs=1e-4)  # Scene15's test set: about a point either side


def test_the_paired_test_counts_only_images_both_scored_with_the_same_class() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 300)
    first = ImageOutcomes(np.arange(300, dtype=np.uint64), labels,
                         np.where(rng.random(300) < 0.85, labels, (labels + 1) % 4))
    shared = np.arange(50, 350)  # images 300-349 only the second scored; 0-49 only the first
    second_labels = np.where(shared < 300, labels[np.minimum(shared, 299)], 0)
    second_labels[shared == 60] = (labels[60] + 1) % 4  # relabelled since: not the same test
    second = ImageOutcomes(shared.astype(np.uint64)[::-1].copy(), second_labels[::-1].copy(),  # another order
                          np.where(rng.random(300) < 0.7, second_labels, (second_labels + 2) % 4)[::-1].copy())

    paired = paired_difference(first, second)
    by_image = {int(i): (l, p) for i, l, p in zip(second.image, second.label, second.predicted)}
    only_first = only_second = images = 0
    for image in range(50, 300):
        if image == 60:
            continue
        images += 1
        right_first = first.predicted[image] == labels[image]
        right_second = by_image[image][1] == labels[image]
        only_first += right_first and not right_second
        only_second += right_second and not right_first
    assert (paired.images, paired.only_first, paired.only_second) == (images, only_first, only_second)
    exact = binomtest(min(only_first, only_second), only_first + only_second, 0.5).pvalue
    assert paired.p_value == pytest.approx(exact, rel=1e-9) and paired.p_value < 0.01
    same = paired_difference(first, first)
    assert (same.only_first, same.only_second, same.p_value) == (0, 0, 1.0)


@pytest.fixture
def two_heads(tmp_path: Path) -> Path:
    """logreg and k-NN on overlapping gaussian classes, so that both make mistakes."""
    features, _ = gaussian_blobs(80, 4, 16, seed=3, spread=3.0)
    cache = write_synthetic_cache(tmp_path / "blobs.h5", n_per_class=80, n_classes=4, features=features)
    fit_heads([cache], head=["logreg", "knn"], out=tmp_path / "heads")
    return tmp_path


def test_compare_pairs_each_head_with_the_first_on_the_test_images(two_heads: Path) -> None:
    out_csv = two_heads / "table.csv"
    result = runner.invoke(app, ["compare", str(two_heads / "heads"), "--csv", str(out_csv)])
    assert result.exit_code == 0, result.output
    with open(out_csv, newline="") as handle:
        rows = {row["model"]: row for row in csv.DictReader(handle)}
    first, second = sorted(rows, key=lambda name: rows[name]["rank"])

    # Recomputed from the heads themselves: each predicts the cache's test rows.
    data = tlfeat.load(two_heads / "blobs.h5", split="test")
    right = {}
    for name in rows:
        estimator, meta = load_head(two_heads / f"{name}.skops")
        right[name] = estimator.predict(data.features) == data.labels
        low, high = accuracy_interval(float(np.mean(right[name])), len(data.labels))
        assert (float(rows[name]["test 95% CI low"]), float(rows[name]["test 95% CI high"])) == pytest.approx((low, high))
        shown = next(line.split(" | ") for line in result.output.splitlines() if f"| {name} |" in line)
        assert shown[10] == f"{low:.4f}-{high:.4f}"
    only_first = int(np.sum(right[first] & ~right[second]))
    only_second = int(np.sum(right[second] & ~right[first]))
    assert only_first + only_second > 0  # the heads disagree somewhere: the test is not vacuous
    assert rows[first]["p vs #1"] == rows[first]["paired test images"] == ""
    assert int(rows[second]["paired test images"]) == len(data.labels)
    assert float(rows[second]["p vs #1"]) == pytest.approx(
        binomtest(min(only_first, only_second), only_first + only_second, 0.5).pvalue, rel=1e-6)
    table_row = next(line.split(" | ") for line in result.output.splitlines() if f"| {first} |" in line)
    assert table_row[11] == "-"  # #1 is not tested against itself
    assert f"p vs #1 is McNemar's exact test of each model against #1 ({first}) on the test images both scored " \
           f"({len(data.labels)})" in result.output


def test_each_head_keeps_its_outcome_on_every_test_image_it_scored(two_heads: Path) -> None:
    data = tlfeat.load(two_heads / "blobs.h5", split="test")
    fit_heads([two_heads / "blobs.h5"], head="logreg", streaming=True, out=two_heads / "streaming")
    for model in (two_heads / "heads" / "logreg.skops", two_heads / "heads" / "knn.skops",
                  two_heads / "streaming" / "logreg-streaming.skops"):
        outcomes = read_test_outcomes(model)
        estimator, meta = load_head(model)
        assert np.array_equal(outcomes.image, image_keys(data.paths, [100] * len(data.paths)))
        assert np.array_equal(outcomes.label, data.labels)
        assert np.array_equal(outcomes.predicted, estimator.predict(data.features))
        assert np.mean(outcomes.predicted == outcomes.label) == pytest.approx(meta["scores"]["test"]["accuracy"])
        assert meta["metrics"]["test"]["accuracy_ci95"] == pytest.approx(
            list(accuracy_interval(meta["scores"]["test"]["accuracy"], len(data.labels))))


def _as_written_before(model: Path) -> None:
    """Rewrite a head file as fit-head wrote it before heads kept their test outcomes: no tlfeat-test.npz."""
    with zipfile.ZipFile(model) as archive:
        members = {name: archive.read(name) for name in archive.namelist() if name != TEST_MEMBER}
    with zipfile.ZipFile(model, "w") as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    assert read_test_outcomes(model) is None and read_metadata(model, whole=True)["format_version"] == 2


def test_a_head_made_before_outcomes_were_kept_is_said_not_paired(two_heads: Path) -> None:
    first, second = (row.name for row in tlfeat.compare(two_heads / "heads").rows)
    _as_written_before(two_heads / f"{second}.skops")
    result = tlfeat.compare(two_heads / "heads")
    assert [row.versus_first for row in result.rows] == [None, None]
    assert f"{second}: no p vs #1, no per-image test outcomes recorded (made before tlfeat kept them; fit the " \
           "head or fine-tune the run again for one)" in result.notes
    assert result.table.splitlines()[3].split(" | ")[11] == "n/a"

    _as_written_before(two_heads / f"{first}.skops")
    notes = tlfeat.compare(two_heads / "heads").notes
    assert any(f"no p vs #1, as #1 ({first}) has no per-image test outcomes (made before tlfeat kept them" in note
               for note in notes), notes


def _with_outcomes(model: Path, payload: bytes) -> None:
    """Rewrite a head file with `payload` as its tlfeat-test.npz (a valid CRC: damage the zip cannot see)."""
    with zipfile.ZipFile(model) as archive:
        members = {name: archive.read(name) for name in archive.namelist() if name != TEST_MEMBER}
    with zipfile.ZipFile(model, "w") as archive:
        for name, payload_of in {**members, TEST_MEMBER: payload}.items():
            archive.writestr(name, payload_of)


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.mark.parametrize("payload, why", [
    # Before: "error: aborted" and nothing else (click reads numpy's EOFError as end of input at a prompt).
    (b"", "empty or cut short"),
    # Before: a TypeError traceback.
    (_npz(image=np.uint64(1), label=np.int32(0), predicted=np.int32(0)), "its arrays are not one value per image"),
    # Before: an IndexError traceback, or, when the indices happened to fit, p-values from the wrong images.
    (_npz(image=np.array([5, 5, 7], np.uint64), label=np.zeros(3, np.int32), predicted=np.zeros(3, np.int32)),
     "it lists an image twice"),
], ids=["empty", "scalars", "duplicates"])
def test_damaged_outcomes_cost_a_head_its_p_value_in_a_note_naming_the_file(two_heads: Path, payload: bytes,
                                                                           why: str) -> None:
    first, second = (row.name for row in tlfeat.compare(two_heads / "heads").rows)
    model = two_heads / f"{second}.skops"
    _with_outcomes(model, payload)
    result = runner.invoke(app, ["compare", str(two_heads / "heads")])
    assert result.exit_code == 0, result.output
    assert f"note: {second}: no p vs #1, {model}: its {TEST_MEMBER} is unreadable (ValueError: {why})" \
           in " ".join(result.output.split())
    assert tlfeat.compare(two_heads / "heads").rows[1].versus_first is None


def _run_summary(val: float, test: bool) -> dict:
    """A finished run's summary.json on a 6-image test split, with or without a test score."""
    scores = {s: {"n": 6, "accuracy": val, "macro_f1": val} for s in ("train", "val", "test")}
    if not test:
        del scores["test"]
    return {"format": "tlfeat-finetune", "format_version": 1, "backbone": "vgg16", "weights": "none", "image_size": 32,
            "unfreeze_top": 2, "method": "fine-tuned, top 2 layers", "trainable_params": 1, "seed": 0,
            "split_ratios": [0.5, 0.25, 0.25], "dataset_root": "/data/tiny", "dataset_fingerprint": "f",
            "classes": ["a", "b"], "split_counts": {"train": 12, "val": 6, "test": 6}, "scores": scores,
            "seconds": 1.0}


@pytest.mark.parametrize("first_val, first_test, why", [
    (0.9, False, "#1 (a) has no test score"),  # e.g. every test image of #1 a copy of one it trained on
    (None, True, "no model is ranked (none has a val score)"),
], ids=["first-without-test", "none-ranked"])
def test_a_p_value_missing_for_want_of_a_first_is_said(tmp_path: Path, first_val: float | None, first_test: bool,
                                                        why: str) -> None:
    # Before: the other rows read "n/a" and no note said why.
    first, second = _run_summary(first_val or 0.5, first_test), _run_summary(0.5, True)
    if first_val is None:
        del first["scores"]["val"], second["scores"]["val"]
    for name, summary in (("a", first), ("b", second)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
        outcomes = ImageOutcomes(np.arange(6, dtype=np.uint64), np.zeros(6), np.r_[0, 0, 0, 1, 1, 1])
        (tmp_path / name / "test_outcomes.npz").write_bytes(outcomes.to_npz())
    result = tlfeat.compare(tmp_path)
    assert all(row.versus_first is None for row in result.rows)
    assert f"tiny (seed 0, split 50/25/25): no p vs #1, as {why}" in result.notes, result.notes


def test_the_chart_shows_each_test_interval_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: the axis was zoomed to the bars only, so the whisker of a test score on 6 images (0.19-0.81 around
    # 0.5) ran off the bottom of the panel and read as a narrower interval.
    from tlfeat.apps import compare as compare_module

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps(_run_summary(0.5, True)))
    figures = []
    monkeypatch.setattr(compare_module, "save_png", lambda fig, path: figures.append(fig))
    row = compare_module.compare(tmp_path / "run", png=tmp_path / "bars.png").rows[0]
    low, high = figures[0].axes[0].get_ylim()
    assert low <= row.test_interval()[0] and row.test_interval()[1] <= high
