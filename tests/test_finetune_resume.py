"""Fine-tune runs that always resume: after a kill at an epoch boundary or at any final step, --resume finishes the
run, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from conftest import TRAINABLE_SEED, assert_one_line_error, make_dataset
from tlfeat import progress
from tlfeat.errors import Interrupted
from tlfeat.finetuning import train as ft
from tlfeat.finetuning.state import Run

runner = CliRunner()
SETTINGS = dict(backbone="vgg16", weights="none", epochs1=2, epochs2=2, unfreeze_top=2, image_size=32, batch_size=4,
                patience=0, augment=True, seed=TRAINABLE_SEED, progress=False, log=lambda line: None)
MEASURED = ("loss", "accuracy", "val_loss", "val_accuracy")


def history(out: Path) -> list[dict]:
    return json.loads((out / "history.json").read_text())["epochs"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("resume") / "tiny")


@pytest.fixture(scope="module")
def uninterrupted(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    ft.finetune(data, out=out, **SETTINGS)
    return out


@pytest.mark.parametrize("stop_after", [(1, 1), (2, 1)], ids=["in-stage-1", "in-stage-2"])
@pytest.mark.slow
def test_a_run_resumed_at_an_epoch_boundary_matches_an_uninterrupted_one(
    data: Path, uninterrupted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_after: tuple[int, int]
) -> None:
    original = Run.record_epoch

    def ctrl_c_after(self: Run, model: object, stage: int, epoch: int, logs: dict, seconds: float) -> bool:
        stop = original(self, model, stage, epoch, logs, seconds)
        if (stage, epoch) == stop_after:
            raise KeyboardInterrupt
        return stop

    out = tmp_path / "run"
    monkeypatch.setattr(Run, "record_epoch", ctrl_c_after)
    with pytest.raises(Interrupted, match="interrupted"):
        ft.finetune(data, out=out, **SETTINGS)
    monkeypatch.setattr(Run, "record_epoch", original)
    ft.finetune(data, out=out, resume=True, **SETTINGS)

    whole, resumed = history(uninterrupted), history(out)
    assert [(e["stage"], e["epoch"]) for e in resumed] == [(e["stage"], e["epoch"]) for e in whole]
    for a, b in zip(whole, resumed):
        for key in MEASURED:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["stage"], a["epoch"], key)
    summaries = [json.loads((run / "summary.json").read_text()) for run in (uninterrupted, out)]
    assert summaries[1]["best_epoch"] == summaries[0]["best_epoch"]
    for split, scores in summaries[0]["scores"].items():
        assert summaries[1]["scores"][split]["accuracy"] == pytest.approx(scores["accuracy"])


class Killed(BaseException):
    """Stands for SIGKILL: nothing catches it, so the run stops where it is."""


FINAL_STEPS = ("predict_with_model", "write_json", "plot_confusion", "plot_history", "save_model_atomically",
               "write_json#2", "save_state", "rmtree")


@pytest.mark.slow
def test_a_kill_at_any_final_step_leaves_a_run_that_resume_finishes(
    data: Path, uninterrupted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tlfeat.finetuning import finish

    calls: list[str] = []
    kill_at: list[str | None] = [None]

    def spied(name: str, real: object) -> object:
        def call(*args: object, **kwargs: object) -> object:
            calls.append(name)
            label = name if calls.count(name) == 1 else f"{name}#{calls.count(name)}"
            if label == kill_at[0]:
                raise Killed
            return real(*args, **kwargs)
        return call

    for name in FINAL_STEPS[:5]:
        monkeypatch.setattr(finish, name, spied(name, getattr(finish, name)))
    monkeypatch.setattr(Run, "save_state", spied("save_state", Run.save_state))
    monkeypatch.setattr(finish.shutil, "rmtree", spied("rmtree", shutil.rmtree))

    snapshot = tmp_path / "trained"  # every epoch done, nothing of the end written yet
    kill_at[0] = FINAL_STEPS[0]
    with pytest.raises(Killed):
        ft.finetune(data, out=snapshot, **SETTINGS)
    expected = json.loads((uninterrupted / "summary.json").read_text())
    for step in FINAL_STEPS:
        out = tmp_path / step
        shutil.copytree(snapshot, out)
        kill_at[0] = step
        calls.clear()
        with pytest.raises(Killed):
            ft.finetune(data, out=out, resume=True, **SETTINGS)
        kill_at[0] = None
        result = ft.finetune(data, out=out, resume=True, **SETTINGS)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["best_epoch"] == expected["best_epoch"], step
        for split, scores in expected["scores"].items():
            assert summary["scores"][split] == pytest.approx(scores), (step, split)
        assert (out / "model.keras").is_file() and not (out / "checkpoints").exists(), step
        assert json.loads((out / "state.json").read_text())["finished"], step
        assert result.summary["scores"] == summary["scores"]


def resume_cli(data: Path, out: Path, *extra: str) -> object:
    """The CLI spelling of SETTINGS."""
    return runner.invoke(app, [
        "finetune", str(data), "--backbone", "vgg16", "--weights", "none", "--epochs1", "2", "--unfreeze-top", "2",
        "--image-size", "32", "--batch-size", "4", "--patience", "0", "--augment", "--seed", str(TRAINABLE_SEED),
        "--out", str(out), *extra,
    ])


@pytest.mark.slow
def test_resume_of_a_finished_run_refuses_more_epochs_in_one_line(data: Path, uninterrupted: Path,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = resume_cli(data, out, "--epochs2", "4", "--resume", "-q")
    assert_one_line_error(result, "--epochs2 4", "finished", "another --out")
    again = resume_cli(data, out, "--epochs2", "2", "--resume", "-q")
    assert again.exit_code == 0 and "finished already" in again.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.slow
def test_one_clean_line_per_epoch_with_the_progress_bar_on(data: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)  # a progress line at every batch, however fast the machine
    result = resume_cli(data, tmp_path / "run", "--epochs2", "1")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    epoch_lines = [line for line in lines if re.search(r"stage \d epoch \d+/\d+:", line)]
    assert [line.split(":")[0] for line in epoch_lines] == ["stage 1 epoch 1/2", "stage 1 epoch 2/2", "stage 2 epoch 1/1"]
    assert all(re.fullmatch(r"stage \d epoch \d/\d: loss [\d.]+ acc [\d.]+  val loss [\d.]+ val acc [\d.]+  "
                            r"[\d.]+ s(  \(.*\))?", line) for line in epoch_lines), epoch_lines
    assert "loss" not in result.stderr  # the bar shows progress; the numbers are printed once, on the epoch's line
    assert "stage 1 epoch 1/2: 1/" in result.stderr  # the bar was on
