"""compare: one table from real fine-tune runs and fit-head models, CSV and PNG, and one-line refusals."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

import tlfeat
from cli import app
from conftest import TRAINABLE_SEED, assert_one_line_error, fitted_parameters, gaussian_blobs, make_dataset, write_synthetic_cache
from tlfeat.apps import compare as compare_module
from tlfeat.heads.registry import head_trainable_params
from tlfeat.extraction.run import extract
from tlfeat.finetuning import finetune
from tlfeat.finetuning.finish import run_summary
from tlfeat.finetuning.runs import read_run_test_outcomes, run_lock
from tlfeat.finetuning.state import BestEpoch, EpochRecord, Run, RunConfig, RunState, StageState
from tlfeat.heads.fit import fit_heads
from tlfeat.heads.registry import HEAD_NAMES
from tlfeat.heads.rows import image_keys
from tlfeat.heads.store import load_head

runner = CliRunner()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """results/run (a VGG16 fine-tune run) and results/heads (every fit-head head on the same images)."""
    root = tmp_path_factory.mktemp("compare")
    data = make_dataset(root / "tiny")
    finetune(
        data, backbone="vgg16", weights="none", epochs1=1, epochs2=1, unfreeze_top=3, image_size=32, batch_size=4,
        seed=TRAINABLE_SEED, out=root / "results" / "run", progress=False, log=lambda line: None,
    )
    cache = extract(data, root / "tiny-vgg16.h5", backbone="vgg16", weights="none", image_size=32, seed=TRAINABLE_SEED,
                    progress=False).out
    fit_heads([cache], head="all", out=root / "results" / "heads")
    return root / "results"




@pytest.mark.slow
def test_compare_builds_one_table_from_runs_and_heads(results: Path, tmp_path: Path) -> None:
    out_csv, out_png = tmp_path / "table.csv", tmp_path / "bars.png"
    result = runner.invoke(app, ["compare", str(results), "--csv", str(out_csv), "--png", str(out_png)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("| dataset | rank | model | backbone | weights | method | trainable params |")
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with open(out_csv, newline="") as handle:
        rows = {row["model"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"run"} | {f"heads/{h}" for h in HEAD_NAMES}
    vals = [float(row["val acc"]) for row in rows.values()]
    assert vals == sorted(vals, reverse=True)  # ranked by val accuracy
    assert {row["dataset"] for row in rows.values()} == {f"tiny (seed {TRAINABLE_SEED}, split 56.25/18.75/25)"}  # one dataset
    assert sorted(int(row["rank"]) for row in rows.values()) == list(range(1, len(rows) + 1))

    summary = json.loads((results / "run" / "summary.json").read_text())
    run = rows["run"]
    assert run["method"] == "fine-tuned, top 3 layers" and run["backbone"] == "vgg16@32" and run["weights"] == "none"
    assert int(run["trainable params"]) == summary["stages"]["2"]["trainable_params"] == 512 * 128 + 128 + 387 + 2359808
    for split in ("train", "val", "test"):
        assert float(run[f"{split} acc"]) == pytest.approx(summary["scores"][split]["accuracy"])
    assert float(run["test macro-F1"]) == pytest.approx(summary["scores"]["test"]["macro_f1"])
    assert float(run["train s"]) == pytest.approx(summary["seconds"], abs=0.01)

    for head in HEAD_NAMES:
        row = rows[f"heads/{head}"]
        estimator, meta = load_head(results / "heads" / f"{head}.skops")
        assert row["method"] == f"frozen + {head}" and row["backbone"] == "vgg16@32"
        counted = fitted_parameters(estimator)
        assert row["trainable params"] == ("" if counted is None else str(counted))
        assert head_trainable_params(head, 512, 3) == counted
        assert float(row["test acc"]) == pytest.approx(meta["scores"]["test"]["accuracy"])
    assert "| n/a |" in result.output  # k-NN learns no parameters
    assert "heads and fine-tune runs matched by folder, split, class list and images per split" in result.output


@pytest.mark.slow
def test_a_fine_tune_run_keeps_its_test_outcomes_and_pairs_with_the_heads(results: Path, tmp_path: Path) -> None:
    summary = json.loads((results / "run" / "summary.json").read_text())
    outcomes = read_run_test_outcomes(results / "run")
    data = tlfeat.load(results.parent / "tiny-vgg16.h5", split="test")  # the same test images as the run's
    root = Path(summary["dataset_root"])
    keys = image_keys(data.paths, [(root / p).stat().st_size for p in data.paths])
    assert sorted(outcomes.image) == sorted(keys)
    assert np.mean(outcomes.predicted == outcomes.label) == pytest.approx(summary["scores"]["test"]["accuracy"])
    order = {int(key): i for i, key in enumerate(keys)}
    assert [data.labels[order[int(key)]] for key in outcomes.image] == list(outcomes.label)
    predicted = tlfeat.predict(results / "run", [root / data.paths[order[int(key)]] for key in outcomes.image])
    assert [p.top[0][0] for p in predicted.predictions] == [summary["classes"][c] for c in outcomes.predicted]

    rows = tlfeat.compare(results).rows
    first = rows[0]
    assert all(row.versus_first.images == len(data.labels) for row in rows if row is not first)  # heads and run paired
    # A damaged outcomes file costs the run its p-value, in a note; the table is still made.
    shutil.copytree(results / "run", tmp_path / "run")
    (tmp_path / "run" / "test_outcomes.npz").write_bytes(b"PK\x03\x04 cut short")
    notes = tlfeat.compare([tmp_path / "run", results / "heads"]).notes
    assert any("test_outcomes.npz: unreadable (BadZipFile" in note for note in notes), notes


@pytest.mark.slow
def test_compare_takes_files_once_each_and_skips_checkpoints(results: Path, tmp_path: Path) -> None:
    messy = tmp_path / "messy"
    shutil.copytree(results / "run", messy / "run")
    (messy / "run" / "checkpoints").mkdir()
    shutil.copy(results / "run" / "summary.json", messy / "run" / "checkpoints" / "summary.json")
    (messy / "notes.json").write_text('{"format": "something else"}')
    result = runner.invoke(app, [
        "compare", str(messy), str(messy / "run" / "model.keras"), str(results / "heads" / "logreg.skops"),
        str(results / "heads" / "logreg.skops"),
    ])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("| ")]
    assert len(lines) == 3 and {line.split(" | ")[2] for line in lines[1:]} == {"run", "heads/logreg"}


def test_compare_refuses_nothing_found_and_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "other.json").write_text("[1, 2]")
    result = runner.invoke(app, ["compare", str(tmp_path / "empty")])
    assert_one_line_error(result, "no fit-head models or fine-tune runs found")
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_line_error(runner.invoke(app, ["compare", str(tmp_path / "notes.txt")]), "neither a fit-head model")
    assert_one_line_error(runner.invoke(app, ["compare", str(tmp_path / "missing")]), "not found")
    # Before: a run's summary.json cut short was "neither a fit-head model ... nor a fine-tune run".
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text('{"format": "tlfeat-finetune-run", "classes": [')
    assert_one_line_error(runner.invoke(app, ["compare", str(tmp_path / "run" / "summary.json")]),
                          "summary.json: unreadable (JSONDecodeError)")
    # ... and found in a folder: before, the run left the table without a word.
    assert_one_line_error(runner.invoke(app, ["compare", str(tmp_path / "run")]),
                          "summary.json: unreadable (JSONDecodeError)")


def test_compare_never_ranks_across_datasets(tmp_path: Path) -> None:
    scenes = write_synthetic_cache(tmp_path / "scenes.h5", dataset_root="/data/scenes")
    digits = write_synthetic_cache(tmp_path / "digits.h5", dataset_root="/data/digits", seed=1)
    for cache in (scenes, digits):
        for head in ("logreg", "knn"):
            fit_heads([cache], head=head, out=tmp_path / cache.stem)
    out_csv = tmp_path / "table.csv"
    result = runner.invoke(app, ["compare", str(tmp_path / "scenes"), str(tmp_path / "digits"), "--csv", str(out_csv)])
    assert result.exit_code == 0, result.output
    with open(out_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_dataset: dict[str, list[dict]] = {}
    for row in rows:
        by_dataset.setdefault(row["dataset"], []).append(row)
    assert set(by_dataset) == {"digits (seed 1, split ?)", "scenes (seed 0, split ?)"}
    for members in by_dataset.values():  # each dataset ranked on its own, its rows together
        assert [int(r["rank"]) for r in members] == [1, 2]
        assert [float(r["val acc"]) for r in members] == sorted((float(r["val acc"]) for r in members), reverse=True)
    assert [r["dataset"] for r in rows] == sorted(r["dataset"] for r in rows)


def test_the_bar_chart_zooms_to_the_scores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    features, _ = gaussian_blobs(40, 3, 16, seed=0, spread=2.5)  # scores between 0.8 and 1, not spread over 0-1
    cache = write_synthetic_cache(tmp_path / "close.h5", features=features)
    for head in ("logreg", "knn"):
        fit_heads([cache], head=head, out=tmp_path / "heads")
    figures = []
    monkeypatch.setattr(compare_module, "save_png", lambda fig, path: figures.append(fig))
    table = compare_module.compare([tmp_path / "heads"], png=tmp_path / "bars.png")
    scores = [v for r in table.rows for v in (*(r.accuracy(s) for s in ("train", "val", "test")), r.macro_f1())]
    assert min(scores) > 0.5
    shown = scores + [end for r in table.rows for end in r.test_interval()]  # the test accuracy's whiskers too
    low, high = figures[0].axes[0].get_ylim()
    assert min(shown) - 0.1 <= low <= min(shown) and max(shown) <= high  # not the fixed 0-1.15 axis


def test_a_head_without_a_val_score_is_left_unranked_and_said(tmp_path: Path) -> None:
    # Before: a head with no val score (a recipe head is refitted on train+val) ranked last, below worse heads.
    ranked = write_synthetic_cache(tmp_path / "ranked.h5")
    no_val = write_synthetic_cache(tmp_path / "noval.h5", splits=("train", "test"), shares=(0.75, 0.25))
    fit_heads([ranked], head="knn", out=tmp_path / "heads" / "ranked")
    fit_heads([no_val], head="logreg", out=tmp_path / "heads" / "noval")
    result = runner.invoke(app, ["compare", str(tmp_path / "heads")])
    assert result.exit_code == 0, result.output
    rows = {line.split(" | ")[2]: line.split(" | ") for line in result.output.splitlines()[2:] if line.startswith("|")}
    assert rows["noval/logreg"][1] == "-" and rows["ranked/knn"][1] == "1"
    # Before: "(fitted on val too)", of a head whose cache has no val split
    assert "note: noval/logreg: not ranked, no val score (no val images)" in result.output
    assert rows["ranked/knn"][3] == "efficientnet_lite0@32"  # the image size: other sizes are other features


def test_a_run_without_a_val_score_is_not_said_to_be_fitted_on_val(results: Path, tmp_path: Path) -> None:
    # A run whose val images were all copies of its training images (or unreadable) has no val score; the note
    # said "(fitted on val too)", which a fine-tune run never is.
    summary = json.loads((results / "run" / "summary.json").read_text())
    del summary["scores"]["val"]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    notes = tlfeat.compare(tmp_path / "run").notes
    assert notes == ["run: not ranked, no val score (none of its val images left to score; see its summary.json notes)"]


def test_datasets_of_the_same_folder_name_read_as_two(tmp_path: Path) -> None:
    # Before: /data/a/scenes and /data/b/scenes were both "scenes (seed 0, ...)": their rows interleaved.
    for where in ("a", "b"):
        cache = write_synthetic_cache(tmp_path / f"{where}.h5", dataset_root=f"/data/{where}/scenes")
        fit_heads([cache], head="logreg", out=tmp_path / "heads" / where)
    result = compare_module.compare(tmp_path / "heads")
    assert sorted(row.dataset[1] for row in result.rows) == ["/data/a/scenes (seed 0, split ?)",
                                                             "/data/b/scenes (seed 0, split ?)"]


def test_heads_on_other_images_of_the_same_folder_rank_apart(tmp_path: Path) -> None:
    # Before: the key was folder + split seed + shares, so a head fitted before a class (or images) was added to
    # the folder ranked against one fitted after, as one dataset.
    caches = {
        "before": write_synthetic_cache(tmp_path / "before.h5", n_classes=3),
        "added": write_synthetic_cache(tmp_path / "added.h5", n_classes=4),
        "renamed": write_synthetic_cache(tmp_path / "renamed.h5", n_classes=3, path_prefix="x"),  # same counts
    }
    for name, cache in caches.items():
        fit_heads([cache], head="logreg", out=tmp_path / "heads" / name)
    result = compare_module.compare(tmp_path / "heads")
    labels = {row.name: row.dataset[1] for row in result.rows}
    assert len(set(labels.values())) == 3 and len({row.dataset[0] for row in result.rows}) == 3
    assert "3 classes, 120 images" in labels["before/logreg"] and "4 classes, 160 images" in labels["added/logreg"]
    assert labels["before/logreg"].startswith("synthetic (seed 0, split ?; 3 classes, 120 images; images ")
    table = runner.invoke(app, ["compare", str(tmp_path / "heads")])
    assert table.exit_code == 0, table.output
    assert [line.split(" | ")[1] for line in table.output.splitlines()[2:5]] == ["1", "1", "1"]  # each its own rank


def test_one_path_for_both_the_table_and_the_chart_is_refused(tmp_path: Path) -> None:
    # Before: --csv x.csv --png x.csv wrote the table, then the chart over it, and said "wrote" twice.
    cache = write_synthetic_cache(tmp_path / "c.h5")
    fit_heads([cache], head="logreg", out=tmp_path / "heads")
    same = tmp_path / "same.csv"
    result = runner.invoke(app, ["compare", str(tmp_path / "heads"), "--csv", str(same), "--png", str(same)])
    assert_one_line_error(result, "given as both --csv and --png")
    assert not same.exists()


def test_a_class_list_that_differs_counts_what_it_leaves_unnamed(tmp_path: Path) -> None:
    # Before: "not in the model: ['class_3', 'class_4', 'class_5']" for 5 classes the model lacks.
    from tlfeat.errors import TlfeatError

    fit_heads([write_synthetic_cache(tmp_path / "three.h5")], head="logreg", out=tmp_path / "heads")
    eight = write_synthetic_cache(tmp_path / "eight.h5", n_classes=8)
    with pytest.raises(TlfeatError, match="not in the model: class_3, class_4, class_5 and 2 more"):
        tlfeat.evaluate(tmp_path / "heads" / "logreg.skops", eight)


def finished_run_summary(best_stage: int) -> dict:
    """The summary.json a finished VGG16 run (2 epochs of each stage, top 2 layers) writes, its best epoch in
    `best_stage`; built from its state, without training."""
    config = RunConfig(backbone="vgg16", weights="none", weights_identity="none", preprocessing="caffe", image_size=32,
                       unfreeze_top=2, epochs1=2, epochs2=2, lr1=1e-3, lr2=1e-4, batch_size=4, augment=False,
                       patience=0, seed=0, split_ratios=[0.5, 0.25, 0.25], dataset_root="/data/tiny",
                       dataset_fingerprint="f", classes=["a", "b", "c"], base_layers=19)
    state = RunState(best=BestEpoch(2 * best_stage - 1, best_stage, 1, 1.0, 0.5, "best.keras"), seconds=4.0,
                     finished=True)
    for stage, params in ((1, HEAD_PARAMS), (2, HEAD_PARAMS + 2359808)):
        state.stages[stage] = StageState(epochs_run=2, trainable_params=params, non_trainable_params=1, seconds=2.0)
    scores = {s: {"n": 6, "accuracy": 0.5, "macro_f1": 0.5} for s in ("train", "val", "test")}
    return run_summary(Run(Path("run"), config, state, print), SimpleNamespace(name="tiny"), scores,
                       {s: 6 for s in scores}, [], False, None, "tensorflow")


HEAD_PARAMS = 512 * 128 + 128 + 128 * 3 + 3  # the head on VGG16's 512-d features, 3 classes


def test_a_run_whose_best_epoch_is_in_stage_1_is_the_head_on_the_frozen_base(tmp_path: Path) -> None:
    # Before: its model.keras, stage 1's best epoch, was called "fine-tuned, top 2 layers" in summary.json and
    # compare, with stage 2's trainable parameters (the head's and block5_conv3's).
    head_only, fine_tuned = finished_run_summary(best_stage=1), finished_run_summary(best_stage=2)
    assert head_only["method"] == "head on frozen base (best epoch in stage 1 of a fine-tune run)"
    assert head_only["trainable_params"] == HEAD_PARAMS
    assert (fine_tuned["method"], fine_tuned["trainable_params"]) == ("fine-tuned, top 2 layers", HEAD_PARAMS + 2359808)
    # A summary written before: its run is described by the model it saved all the same.
    old = {**head_only, "method": "fine-tuned, top 2 layers", "trainable_params": HEAD_PARAMS + 2359808}
    for name, summary in (("head_only", head_only), ("fine_tuned", fine_tuned), ("old", old)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    rows = {row.name: row for row in tlfeat.compare(tmp_path).rows}
    assert {name: (row.method, row.trainable_params) for name, row in rows.items()} == {
        "head_only": ("head on frozen base (best epoch in stage 1 of a fine-tune run)", HEAD_PARAMS),
        "old": ("head on frozen base (best epoch in stage 1 of a fine-tune run)", HEAD_PARAMS),
        "fine_tuned": ("fine-tuned, top 2 layers", HEAD_PARAMS + 2359808),
    }


def unfinished_run_folder(folder: Path) -> Path:
    """A fine-tune run folder as a run leaves it after its first of 5 epochs (state.json, no summary.json)."""
    config = RunConfig(backbone="vgg16", weights="none", weights_identity="none", preprocessing="caffe", image_size=32,
                       unfreeze_top=2, epochs1=3, epochs2=2, lr1=1e-3, lr2=1e-4, batch_size=4, augment=False,
                       patience=0, seed=0, split_ratios=[0.5, 0.25, 0.25], dataset_root="/data/tiny",
                       dataset_fingerprint="f", classes=["a", "b", "c"], base_layers=19)
    folder.mkdir(parents=True)
    Run(folder, config, RunState(history=[EpochRecord(1, 1, 1, 1.0, 0.5, 1.0, 0.5, 1e-3, 1.0)]), print).save_state()
    return folder


def test_a_run_that_has_not_finished_is_named_not_left_out_without_a_word(tmp_path: Path) -> None:
    # Before: in a folder, a run killed before its end (state.json, no summary.json) was left out without a word;
    # named, it was "no fit-head models or fine-tune runs found".
    done = tmp_path / "runs" / "done"
    done.mkdir(parents=True)
    (done / "summary.json").write_text(json.dumps(finished_run_summary(best_stage=2)))
    killed = unfinished_run_folder(tmp_path / "runs" / "L1")
    unfinished = (f"a fine-tune run that has not finished (1 of 5 epochs); resume it with "
                  f"`tlfeat finetune /data/tiny --out {killed} --resume`")

    for named in (killed, killed / "state.json"):
        assert_one_line_error(runner.invoke(app, ["compare", str(named)]), f"{killed}: {unfinished}")
    image = tmp_path / "photo.png"
    image.write_bytes(b"")
    assert_one_line_error(runner.invoke(app, ["predict", str(killed), str(image)]), f"{killed}: {unfinished}")
    result = runner.invoke(app, ["compare", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert [line.split(" | ")[2] for line in result.output.splitlines()[2:] if line.startswith("| ")] == ["done"]
    assert f"note: {killed}: left out, {unfinished}" in result.output
    shutil.rmtree(done)  # nothing finished left: the error says what there is
    assert_one_line_error(runner.invoke(app, ["compare", str(tmp_path / "runs")]),
                          "no fit-head models or finished fine-tune runs found", f"{killed}: left out, {unfinished}")


def test_a_run_still_training_is_named_as_such_not_told_to_resume(tmp_path: Path) -> None:
    # Before: a run training in another process right now was "not finished; resume it with ... --resume", and
    # that resume is refused while the run is alive.
    live = unfinished_run_folder(tmp_path / "live")
    with run_lock(live):  # what a live finetune holds from before its model is built to its end
        training = f"a fine-tune run still training (pid {os.getpid()} on {socket.gethostname()}; 1 of 5 epochs so far)"
        assert_one_line_error(runner.invoke(app, ["compare", str(live)]), f"{live}: {training}; wait for it to finish")
        (tmp_path / "photo.png").write_bytes(b"")
        assert_one_line_error(runner.invoke(app, ["predict", str(live), str(tmp_path / "photo.png")]),
                              f"{live}: {training}")
    assert "resume it with `tlfeat finetune /data/tiny" in runner.invoke(app, ["compare", str(live)]).output
    assert not (live / "run.lock").exists()  # the probe created no lock file of its own
