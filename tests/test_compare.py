"""compare: one table from real fine-tune runs and fit-head models, CSV and PNG, and one-line refusals."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from conftest import TRAINABLE_SEED, assert_one_line_error, fitted_parameters, make_dataset
from tlfeat.heads.registry import head_trainable_params
from tlfeat.extraction.run import extract
from tlfeat.finetuning import finetune
from tlfeat.heads.fit import fit_heads
from tlfeat.heads.registry import HEAD_NAMES
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




def test_compare_builds_one_table_from_runs_and_heads(results: Path, tmp_path: Path) -> None:
    out_csv, out_png = tmp_path / "table.csv", tmp_path / "bars.png"
    result = runner.invoke(app, ["compare", str(results), "--csv", str(out_csv), "--png", str(out_png)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("| model | backbone | weights | method | trainable params |")
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with open(out_csv, newline="") as handle:
        rows = {row["model"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"run"} | {f"heads/{h}" for h in HEAD_NAMES}
    vals = [float(row["val acc"]) for row in rows.values()]
    assert vals == sorted(vals, reverse=True)  # ranked by val accuracy

    summary = json.loads((results / "run" / "summary.json").read_text())
    run = rows["run"]
    assert run["method"] == "fine-tuned, top 3 layers" and run["backbone"] == "vgg16" and run["weights"] == "none"
    assert int(run["trainable params"]) == summary["stages"]["2"]["trainable_params"] == 512 * 128 + 128 + 387 + 2359808
    for split in ("train", "val", "test"):
        assert float(run[f"{split} acc"]) == pytest.approx(summary["scores"][split]["accuracy"])
    assert float(run["test macro-F1"]) == pytest.approx(summary["scores"]["test"]["macro_f1"])
    assert float(run["train s"]) == pytest.approx(summary["seconds"], abs=0.01)

    for head in HEAD_NAMES:
        row = rows[f"heads/{head}"]
        estimator, meta = load_head(results / "heads" / f"{head}.joblib")
        assert row["method"] == f"frozen + {head}" and row["backbone"] == "vgg16"
        counted = fitted_parameters(estimator)
        assert row["trainable params"] == ("" if counted is None else str(counted))
        assert head_trainable_params(head, 512, 3) == counted
        assert float(row["test acc"]) == pytest.approx(meta["scores"]["test"]["accuracy"])
    assert "| n/a |" in result.output  # k-NN learns no parameters


def test_compare_takes_files_once_each_and_skips_checkpoints(results: Path, tmp_path: Path) -> None:
    messy = tmp_path / "messy"
    shutil.copytree(results / "run", messy / "run")
    (messy / "run" / "checkpoints").mkdir()
    shutil.copy(results / "run" / "summary.json", messy / "run" / "checkpoints" / "summary.json")
    (messy / "notes.json").write_text('{"format": "something else"}')
    result = runner.invoke(app, [
        "compare", str(messy), str(messy / "run" / "model.keras"), str(results / "heads" / "logreg.joblib"),
        str(results / "heads" / "logreg.json"),
    ])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("| ")]
    assert len(lines) == 3 and {line.split(" | ")[0] for line in lines[1:]} == {"| run", "| heads/logreg"}


def test_compare_refuses_nothing_found_and_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "other.json").write_text("[1, 2]")
    result = runner.invoke(app, ["compare", str(tmp_path / "empty")])
    assert_one_line_error(result, "no fit-head models or fine-tune runs found")
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_line_error(runner.invoke(app, ["compare", str(tmp_path / "notes.txt")]), "neither a fit-head model")
    assert_one_line_error(runner.invoke(app, ["compare", str(tmp_path / "missing")]), "not found")
