"""finetune: the right layers trainable per stage, BatchNorm statistics untouched, outputs, resume, bad input."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from conftest import (
    REPO, TRAINABLE_SEED, assert_one_line_error, live_train_graphs, make_dataset, training_accuracy_under_jax,
)
from tlfeat.finetuning import runs as ft_runs
from tlfeat.finetuning import train as ft
from tlfeat.finetuning.data import image_batches_class
from tlfeat.finetuning.model import build_finetune_model, compile_model, outputs_logits, with_probabilities
from tlfeat.finetuning.state import Run, RunConfig, RunState, open_run, run_lock
from tlfeat.backbones import build_model, get_backbone
from tlfeat.data.scan import scan_dataset
from tlfeat.data.decode import decode_image
from tlfeat.errors import Interrupted, TlfeatError
from tlfeat.heads.keras_head import study_head
from tlfeat.heads.rows import image_keys

runner = CliRunner()
QUIET = dict(progress=False, log=lambda line: None)
HEAD_PARAMS_VGG16 = 512 * 128 + 128 + 128 * 3 + 3  # Dense(128) + softmax over 3 classes on 512-d features


def finetune_cli(*args: str | Path) -> object:
    return runner.invoke(app, ["finetune", *map(str, args)])


def vgg16_args(data: Path, out: Path, *extra: str) -> list[str | Path]:
    """Small, fast settings: random VGG16 at 32 px, early stopping off."""
    return [data, "--backbone", "vgg16", "--weights", "none", "--image-size", "32", "--batch-size", "4",
            "--patience", "0", "--seed", str(TRAINABLE_SEED), "-q", "--out", out, *extra]


def array(variable: object) -> np.ndarray:
    return keras.ops.convert_to_numpy(variable)


def bn_statistics(base: object) -> dict[str, list[np.ndarray]]:
    return {
        layer.name: [array(w) for w in (layer.moving_mean, layer.moving_variance)]
        for layer in base.layers if layer.__class__.__name__ == "BatchNormalization"
    }


@pytest.mark.slow
def test_stages_train_the_right_layers_and_never_touch_batchnorm_statistics(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    k = 10  # EfficientNet-Lite0's last 10 layers hold top_bn, block7a_project_bn and block7a_bn
    spec = get_backbone("efficientnet_lite0")
    pretrained = build_model(spec, "imagenet", 32)
    expected_stats = bn_statistics(pretrained)
    unfrozen_names = {layer.name for layer in pretrained.layers[-k:] if layer.weights}
    unfrozen_bn = {name for name in expected_stats if name in unfrozen_names}
    assert len(unfrozen_bn) == 3
    top_params = sum(int(np.prod(w.shape)) for layer in pretrained.layers[-k:] for w in layer.trainable_weights)

    snapshots = []  # what the model looked like at the end of every epoch
    original_record = Run.record_epoch

    def spy(self: object, model: object, stage: int, epoch: int, logs: dict, seconds: float) -> bool:
        base = ft.base_of(model)
        trainable = {id(w) for w in model.trainable_weights}
        snapshots.append({
            "stage": stage,
            "trainable_params": sum(int(np.prod(w.shape)) for w in model.trainable_weights),
            "trainable_layers": {layer.name for layer in base.layers if any(id(w) in trainable for w in layer.weights)},
            "stats": bn_statistics(base),
            "gamma": {name: array(base.get_layer(name).gamma) for name in unfrozen_bn},
            "stem": array(base.get_layer("stem_conv").kernel),
        })
        return original_record(self, model, stage, epoch, logs, seconds)

    monkeypatch.setattr(Run, "record_epoch", spy)
    result = ft.finetune(
        tiny_dataset, backbone="efficientnet_lite0", weights="imagenet", epochs1=2, epochs2=2, unfreeze_top=k,
        seed=TRAINABLE_SEED,
        image_size=32, batch_size=4, augment=True, patience=0, out=tmp_path / "run", **QUIET,
    )

    stages = result.summary["stages"]
    assert [s["stage"] for s in snapshots] == [1, 1, 2, 2]
    head_params = stages["1"]["trainable_params"]
    assert head_params == 1280 * 128 + 128 + 128 * 3 + 3
    assert stages["2"]["trainable_params"] == head_params + top_params
    assert result.summary["base_layers"] == len(pretrained.layers) and result.summary["unfreeze_top"] == k
    for snap in snapshots:
        if snap["stage"] == 1:
            assert snap["trainable_layers"] == set() and snap["trainable_params"] == head_params
        else:
            assert snap["trainable_layers"] == unfrozen_names
            assert snap["trainable_params"] == stages["2"]["trainable_params"]
        for name, (mean, variance) in snap["stats"].items():  # moving statistics: pretrained, in both stages
            np.testing.assert_array_equal(mean, expected_stats[name][0], err_msg=name)
            np.testing.assert_array_equal(variance, expected_stats[name][1], err_msg=name)
        np.testing.assert_array_equal(snap["stem"], array(pretrained.get_layer("stem_conv").kernel))
    # Control: the unfrozen BatchNorm layers did train in stage 2 (gamma moved) while their statistics stayed.
    for name in unfrozen_bn:
        np.testing.assert_array_equal(snapshots[1]["gamma"][name], array(pretrained.get_layer(name).gamma))
    assert any(not np.array_equal(snapshots[-1]["gamma"][n], snapshots[1]["gamma"][n]) for n in unfrozen_bn)
    assert result.summary["augment"] is True and result.summary["augmentation"]


@pytest.mark.slow
def test_stage_2_starts_from_the_best_stage_1_epoch(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    head_kernels = []  # head weights after each epoch, then at the moment stage 2 unfreezes the base
    original_record, original_unfreeze = Run.record_epoch, ft.set_unfrozen_top

    def scripted_val_accuracy(self: object, model: object, stage: int, epoch: int, logs: dict, s: float) -> bool:
        head_kernels.append(array(model.get_layer("head_dense").kernel))
        if stage == 1:  # stage 1's epoch 2 is its best by far, epoch 3 its last
            logs = {**logs, "val_accuracy": 0.9 if epoch == 2 else 0.1}
        return original_record(self, model, stage, epoch, logs, s)

    def spy_unfreeze(model: object, k: int) -> None:
        if k:
            head_kernels.append(array(model.get_layer("head_dense").kernel))
        original_unfreeze(model, k)

    monkeypatch.setattr(Run, "record_epoch", scripted_val_accuracy)
    monkeypatch.setattr(ft, "set_unfrozen_top", spy_unfreeze)
    lines: list[str] = []
    ft.finetune(
        tiny_dataset, backbone="vgg16", weights="none", epochs1=3, epochs2=1, unfreeze_top=2, image_size=32,
        seed=TRAINABLE_SEED,
        batch_size=4, patience=0, out=tmp_path / "run", progress=False, log=lines.append,
    )
    after_epoch_2, after_epoch_3, stage_2_start = head_kernels[1], head_kernels[2], head_kernels[3]
    assert not np.array_equal(after_epoch_2, after_epoch_3)
    np.testing.assert_array_equal(stage_2_start, after_epoch_2)
    assert "stage 2 starts from stage 1's best epoch 2 (val acc 0.900" in "\n".join(lines)


@pytest.mark.slow
def _flat_base() -> keras.Model:
    """A stand-in backbone for head-only checks: an 8x8x3 image flattened into 192 features."""
    inputs = keras.Input((8, 8, 3))
    return keras.Model(inputs, keras.layers.Flatten()(inputs))


def test_runs_train_to_logits_and_save_a_model_that_ends_in_the_softmax() -> None:
    model = build_finetune_model(_flat_base(), 3, 8, "flat")
    compile_model(model, 1e-3, False)
    assert outputs_logits(model) and model.loss.get_config()["from_logits"]
    saved = with_probabilities(model)
    images = np.random.default_rng(0).uniform(0, 255, (4, 8, 8, 3)).astype(np.float32)
    logits, proba = keras.ops.convert_to_numpy(model(images)), keras.ops.convert_to_numpy(saved(images))
    assert not outputs_logits(saved) and np.allclose(proba, keras.ops.convert_to_numpy(keras.ops.softmax(logits)))
    # A checkpoint of a run from before, its head ending in the softmax, resumes with the loss it trained with.
    inputs = keras.Input((8, 8, 3))
    old = keras.Model(inputs, study_head(_flat_base()(inputs), 3, name="head"))
    compile_model(old, 1e-3, False)
    assert not outputs_logits(old) and not old.loss.get_config()["from_logits"] and with_probabilities(old) is old


@pytest.mark.slow
def test_the_head_learns_large_features_under_jax_as_under_tensorflow() -> None:
    # Before: the loss was taken from the softmax's probabilities, which JAX's (and torch's) Keras clips at 1e-7
    # where TensorFlow's recovers the logits: an image scored below the clip for its class gave no gradient.
    accuracy = training_accuracy_under_jax(
        "from test_finetune import _flat_base; from tlfeat.finetuning.model import build_finetune_model, compile_model\n"
        "keras.utils.set_random_seed(0); model = build_finetune_model(_flat_base(), 5, 8, 'flat')\n"
        "compile_model(model, 1e-3, 'auto'); images = 30 * X.reshape(-1, 8, 8, 3)\n"
        "model.fit(images, y, epochs=5, verbose=0); predicted = np.argmax(model.predict(images, verbose=0), 1)"
    )
    assert accuracy >= 0.95


def test_fine_tune_runs_in_one_process_leave_no_train_graph_behind(tmp_path: Path) -> None:
    # Before: each run left its stages' traced train steps, the whole backbone's graph, in TensorFlow's
    # process-wide gradient registry: 124 graphs and about 110 MB a run of a 64 px Lite0 in a notebook.
    data = make_dataset(tmp_path / "tiny")
    for run in range(2):
        ft.finetune(data, backbone="vgg16", weights="none", epochs1=1, epochs2=1, unfreeze_top=3, image_size=32,
                    batch_size=4, seed=TRAINABLE_SEED, out=tmp_path / f"run{run}", **QUIET)
        if run == 0:
            before = live_train_graphs()
    assert live_train_graphs() <= before


def test_run_writes_every_output_skips_unreadable_images_and_predicts(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "tiny")
    (data / "class_0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    split_of = {e.relpath: e.split for e in scan_dataset(data, seed=TRAINABLE_SEED).entries}
    a_train, a_test = (next(p for p, s in split_of.items() if s == split and p.startswith("class_1/"))
                       for split in ("train", "test"))
    (data / a_test).write_bytes((data / a_train).read_bytes())  # a test image that is a copy of a training one
    out = tmp_path / "run"
    result = finetune_cli(*vgg16_args(data, out, "--epochs1", "2", "--epochs2", "2", "--unfreeze-top", "3"))
    assert result.exit_code == 0, result.output
    assert "skipped class_0/broken.png: " in result.output
    copies = "test: 1 images left out of the score, copies (the same bytes) of images the run trained or chose"
    assert f"note: {copies}" in result.output  # before: scored, as fit-head and evaluate never do
    assert "trainable params 66,051" in result.output
    assert f"trainable params {HEAD_PARAMS_VGG16 + 2359808:,}" in result.output  # + block5_conv3

    expected = {"model.keras", "summary.json", "metrics.json", "history.csv", "history.json", "training.png",
                "confusion.png", "state.json", "test_outcomes.npz"}
    assert {p.name for p in out.iterdir()} == expected  # checkpoints/ and the lock are gone
    for png in ("training.png", "confusion.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["format"] == "tlfeat-finetune" and summary["backbone"] == "vgg16"
    assert summary["unfreeze_top"] == 3 and summary["base_layers"] == 20
    assert summary["method"] == "fine-tuned, top 3 layers"
    assert summary["stages"]["1"]["trainable_params"] == HEAD_PARAMS_VGG16
    assert summary["stages"]["2"]["trainable_params"] == HEAD_PARAMS_VGG16 + 2359808  # + block5_conv3
    assert [summary["stages"][s]["epochs_run"] for s in ("1", "2")] == [2, 2]
    assert summary["classes"] == ["class_0", "class_1", "class_2"] and summary["image_size"] == 32
    assert list(summary["skipped"]) == ["class_0/broken.png"]
    scan = scan_dataset(data, seed=TRAINABLE_SEED)  # the split extract makes
    readable = scan.split_counts()
    readable[next(e.split for e in scan.entries if e.relpath == "class_0/broken.png")] -= 1
    assert {s: v["n"] for s, v in summary["scores"].items()} == {**readable, "test": readable["test"] - 1}
    assert summary["split_counts"] == readable  # before: the unreadable file was counted in its split
    assert summary["notes"][0].startswith(copies)
    # The outcome on each test image scored: neither the copy of a training image nor an unreadable one.
    tested = [e for e in scan.entries if e.split == "test" and e.relpath not in (a_test, "class_0/broken.png")]
    outcomes = ft_runs.read_run_test_outcomes(out)
    assert sorted(outcomes.image) == sorted(image_keys([e.relpath for e in tested], [e.size for e in tested]))
    assert np.mean(outcomes.predicted == outcomes.label) == pytest.approx(summary["scores"]["test"]["accuracy"])

    with open(out / "history.csv", newline="") as handle:
        history = list(csv.DictReader(handle))
    assert [(int(r["stage"]), int(r["epoch"])) for r in history] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert json.loads((out / "history.json").read_text())["stage2_starts_at"] == 3
    metrics = json.loads((out / "metrics.json").read_text())
    for split, m in metrics["splits"].items():
        assert np.sum(m["confusion_matrix"]) == m["n"] == summary["scores"][split]["n"]
        assert set(m["per_class"]) == set(summary["classes"])
        assert m["accuracy"] == pytest.approx(summary["scores"][split]["accuracy"])

    model, meta = ft_runs.load_finetuned(out)
    assert model.output.shape[-1] == 3 and meta["best_epoch"]["global_epoch"] in range(1, 5)
    good = data / "class_2" / "img_000.png"
    proba, ok, failures, names = ft_runs.predict_files(out / "model.keras", [good, data / "class_0" / "broken.png"])
    assert proba.shape == (1, 3) and ok == [0] and names == summary["classes"]
    assert np.allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert failures == [(str(data / "class_0" / "broken.png"), summary["skipped"]["class_0/broken.png"])]

    shown = runner.invoke(app, ["predict", str(out), str(good), "--top", "3"])  # cli.py predict takes a run
    assert shown.exit_code == 0, shown.output
    assert "predict vgg16: 1/1 images (100%)" in shown.stderr  # before: no progress for a run, -q or not
    assert "predict vgg16" not in runner.invoke(app, ["predict", str(out), str(good), "-q"]).stderr
    line = next(row for row in shown.output.splitlines() if row.startswith(str(good)))
    shown_proba = {name: float(p) for name, p in (cell.split() for cell in line.split("\t")[1:])}
    assert set(shown_proba) == set(names)
    assert all(abs(shown_proba[n] - proba[0, i]) < 1e-3 for i, n in enumerate(names))


def test_unfreezing_only_layers_without_weights_says_so(tmp_path: Path) -> None:
    # Before: `--unfreeze-top 2` on VGG16 (its pooling layers) logged "top 2 of 20 base layers unfrozen", and
    # the run was called fine-tuned, while stage 2 trained the head alone.
    data = make_dataset(tmp_path / "tiny", per_class=4)
    result = finetune_cli(*vgg16_args(data, tmp_path / "run", "--epochs1", "1", "--epochs2", "1", "--unfreeze-top", "2"))
    assert result.exit_code == 0, result.output
    assert ("stage 2: top 2 of 20 base layers unfrozen (none of them holds weights, so the head alone trains on; "
            "the top 3 reach the first that does)") in result.output


@pytest.mark.parametrize("test_images", ["copies", "unreadable"])
def test_a_split_left_with_nothing_to_score_is_not_scored_and_the_run_finishes(tmp_path: Path,
                                                                               test_images: str) -> None:
    # Before: split_metrics got no rows and raised ValueError at the end of training (a traceback), and every
    # --resume raised it again: the run could never finish.
    data = make_dataset(tmp_path / "tiny")
    split_of = {e.relpath: e.split for e in scan_dataset(data, seed=TRAINABLE_SEED).entries}
    a_train = next(p for p, s in split_of.items() if s == "train")
    for relpath in (p for p, s in split_of.items() if s == "test"):
        (data / relpath).write_bytes((data / a_train).read_bytes() if test_images == "copies" else b"not an image")
    out = tmp_path / "run"
    result = finetune_cli(*vgg16_args(data, out, "--epochs1", "1", "--epochs2", "0"))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["scores"]) == {"train", "val"}
    assert summary["notes"][-1].startswith("test: ") and summary["notes"][-1].endswith(", so no score")
    assert f"note: {summary['notes'][-1]}" in result.output
    assert set(json.loads((out / "metrics.json").read_text())["splits"]) == {"train", "val"}


def test_resume_removes_what_a_killed_writer_left_half_written(tmp_path: Path) -> None:
    # Before: a SIGKILL while the end of a run copied the best checkpoint to model.keras left
    # .model.tmp-<pid>.keras (7 MB of a 15 MB model on a Scene15 subset) in the run folder for good: the resume
    # finished the run and never removed it.
    data = make_dataset(tmp_path / "tiny")
    out = tmp_path / "run"
    args = vgg16_args(data, out, "--epochs1", "1", "--epochs2", "0")
    assert finetune_cli(*args).exit_code == 0
    leftovers = [out / ".model.tmp-99999.keras", out / ".state.tmp-99999.json"]
    for path in leftovers:
        path.write_bytes(b"half")
    (out / ".mine").write_text("not tlfeat's")
    result = finetune_cli(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert not any(path.exists() for path in leftovers) and (out / ".mine").exists()


@pytest.mark.slow
def test_resume_after_a_kill_continues_from_the_saved_epoch(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "tiny")
    out = tmp_path / "run"
    args = vgg16_args(data, out, "--epochs1", "12", "--epochs2", "2", "--unfreeze-top", "3")
    state_file = out / "state.json"
    process = subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), "finetune", *map(str, args)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if state_file.exists() and json.loads(state_file.read_text())["history"]:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    at_kill = json.loads(state_file.read_text())
    done = len(at_kill["history"])
    assert 1 <= done < 14 and not at_kill["finished"]
    assert (out / "checkpoints" / at_kill["last_checkpoint"]).is_file()

    # A resume under other settings, or over another dataset, is refused before touching anything.
    other_k = vgg16_args(data, out, "--epochs1", "12", "--epochs2", "2", "--unfreeze-top", "4", "--resume")
    assert_one_line_error(finetune_cli(*other_k), "unfreeze_top")
    (data / "class_1" / "img_999.png").write_bytes((data / "class_1" / "img_000.png").read_bytes())
    assert_one_line_error(finetune_cli(*args, "--resume"), "are not those this run started on")
    (data / "class_1" / "img_999.png").unlink()

    result = finetune_cli(*args, "--resume")
    assert result.exit_code == 0, result.output
    last = at_kill["history"][-1]
    assert f"resuming {out} after stage 1 epoch {last['epoch']} (epoch {done} in all)" in result.output
    final = json.loads(state_file.read_text())
    history = final["history"]
    assert [(e["stage"], e["epoch"]) for e in history] == [(1, e) for e in range(1, 13)] + [(2, 1), (2, 2)]
    assert [e["global_epoch"] for e in history] == list(range(1, 15))
    assert history[:done] == at_kill["history"]  # epochs before the kill are kept, not rerun
    assert final["finished"] and not (out / "checkpoints").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert [summary["stages"][s]["epochs_run"] for s in ("1", "2")] == [12, 2]

    again = finetune_cli(*args, "--resume")
    assert again.exit_code == 0 and "finished already" in again.output


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--backbone", "alexnet"], ["unknown backbone 'alexnet'"]),
        (["--unfreeze-top", "21"], ["--unfreeze-top 21", "only 20 layers"]),
        (["--unfreeze-top", "2", "--unfreeze-all"], ["exclude each other"]),
        (["--image-size", "16"], ["--image-size 16"]),
        # 4 images a class: under seed 0 class_1 draws no train image; the message says what to do
        (["--seed", "0"], ["class(es) class_1 have no images in the train split", "another --seed"]),
    ],
)
def test_bad_options_are_refused_in_one_line(tmp_path: Path, extra: list[str], fragments: list[str]) -> None:
    data = make_dataset(tmp_path / "tiny", per_class=4)
    out = tmp_path / "run"
    assert_one_line_error(finetune_cli(*vgg16_args(data, out), *extra), *fragments)
    assert not out.exists()  # nothing is created for a refused run


def test_run_folders_are_not_overwritten_and_resume_needs_a_run(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "tiny", per_class=4)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert_one_line_error(finetune_cli(*vgg16_args(data, busy)), "is not empty", "--resume")
    result = finetune_cli(*vgg16_args(data, tmp_path / "empty", "--resume"))
    assert_one_line_error(result, "not a fine-tune run to resume")


def test_batches_shuffle_per_epoch_with_the_seed_and_augment_only_training(tiny_dataset: Path) -> None:
    image_batches = image_batches_class()
    files = sorted(tiny_dataset.rglob("*.png"))
    (tiny_dataset / "bad.png").write_bytes(b"")
    files.append(tiny_dataset / "bad.png")
    labels = np.arange(len(files)) % 3
    failed = []

    def batches(shuffle: bool, augment: bool) -> object:
        return image_batches(files, labels, 32, lambda x: x, 5, seed=7, shuffle=shuffle, augment=augment,
                             on_failure=lambda path, reason: failed.append(path.name))

    train = batches(True, True)
    order0 = [int(v) for v in train.order]
    first = train[0]
    assert sorted(order0) == list(range(len(files)))  # every image once per epoch
    np.testing.assert_array_equal(batches(True, True)[0][0], first[0])  # same seed and epoch: same batch
    train.set_epoch(1)
    assert [int(v) for v in train.order] != order0
    train.set_epoch(0)
    np.testing.assert_array_equal(train[0][0], first[0])

    plain = batches(False, False)
    assert len(plain) == 5 and [int(v) for v in plain.order] == list(range(len(files)))
    np.testing.assert_array_equal(plain[0][0][0], decode_image(files[0], 32))  # validation: decoded as is
    assert files[order0[0]].name != "bad.png"
    assert not np.array_equal(first[0][0], decode_image(files[order0[0]], 32))  # training: cropped/flipped
    images, batch_labels, weights = plain[4]
    assert weights.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0] and not images[-1].any() and set(failed) == {"bad.png"}
    np.testing.assert_array_equal(batch_labels, labels[20:])


def test_ctrl_c_while_keras_converts_a_batchs_logs_stops_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under JAX the main thread waits for each training step inside Keras' conversion of the batch's logs to
    # numbers, which sits in a bare `except: pass`: a Ctrl-C landing there was swallowed and the run went on
    # to the end. This delivers the signal at that very point, under any backend.
    from keras.src import backend as keras_backend

    data = make_dataset(tmp_path / "tiny")
    original_convert, original_record = keras_backend.convert_to_numpy, Run.record_epoch
    armed = []

    def arm_after_first_epoch(self: Run, *args: object) -> bool:
        stop = original_record(self, *args)
        armed.append(True)
        return stop

    def convert_then_ctrl_c(value: object) -> object:
        result = original_convert(value)
        if armed and armed.pop():
            signal.raise_signal(signal.SIGINT)  # its handler runs here, inside Keras' `try`
        return result

    monkeypatch.setattr(Run, "record_epoch", arm_after_first_epoch)
    monkeypatch.setattr(keras_backend, "convert_to_numpy", convert_then_ctrl_c)
    with pytest.raises(Interrupted, match=r"interrupted; 1 finished epochs are saved"):
        ft.finetune(data, backbone="vgg16", weights="none", epochs1=3, epochs2=0, image_size=32, batch_size=4,
                    patience=0, seed=TRAINABLE_SEED, out=tmp_path / "run", **QUIET)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_ctrl_c_in_stage_2_then_resume_keeps_unfrozen_layers_and_optimizer_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_dataset(tmp_path / "tiny")
    settings = dict(backbone="vgg16", weights="none", epochs1=1, epochs2=3, unfreeze_top=3, image_size=32,
                    batch_size=4, patience=0, seed=TRAINABLE_SEED, out=tmp_path / "run", **QUIET)
    original_record = Run.record_epoch
    seen = []

    def interrupt_after_stage2_epoch1(
        self: object, model: object, stage: int, epoch: int, logs: dict, seconds: float
    ) -> bool:
        stop = original_record(self, model, stage, epoch, logs, seconds)
        if (stage, epoch) == (2, 1):
            raise KeyboardInterrupt
        return stop

    monkeypatch.setattr(Run, "record_epoch", interrupt_after_stage2_epoch1)
    with pytest.raises(Interrupted, match=r"interrupted; 2 finished epochs are saved .* `resume`"):
        ft.finetune(data, **settings)

    def spy(self: object, model: object, stage: int, epoch: int, logs: dict, seconds: float) -> bool:
        seen.append((stage, epoch, sum(int(np.prod(w.shape)) for w in model.trainable_weights),
                     int(array(model.optimizer.iterations))))
        return original_record(self, model, stage, epoch, logs, seconds)

    monkeypatch.setattr(Run, "record_epoch", spy)
    result = ft.finetune(data, resume=True, **settings)
    steps = 3  # 10 training images in batches of 4
    stage2 = HEAD_PARAMS_VGG16 + 2359808
    assert result.resumed_from == (2, 1)
    # The checkpoint's optimizer carries on: its step count continues from stage 2 epoch 1.
    assert seen == [(2, 2, stage2, 2 * steps), (2, 3, stage2, 3 * steps)]
    assert result.summary["stages"]["2"]["epochs_run"] == 3
    assert result.summary["stages"]["2"]["trainable_params"] == stage2


def _saved_config(tmp_path: Path, **changes: object) -> RunConfig:
    """The config of a small random-VGG16 run on tmp_path/data, as its state.json records it."""
    config = RunConfig(backbone="vgg16", weights="none", weights_identity="none", preprocessing="caffe", image_size=32,
                       unfreeze_top=2, epochs1=2, epochs2=2, lr1=1e-3, lr2=1e-4, batch_size=4, augment=False,
                       patience=0, seed=0, split_ratios=[0.5, 0.25, 0.25], dataset_root=str(tmp_path / "data"),
                       dataset_fingerprint="f", classes=["a", "b"], base_layers=19)
    return replace(config, **changes)


def test_resuming_an_unfinished_run_with_more_epochs_says_so(tmp_path: Path) -> None:
    # Before: the longer schedule was taken without a word.
    config = _saved_config(tmp_path)
    (tmp_path / "run").mkdir()
    Run(tmp_path / "run", config, RunState(), print).save_state()
    lines: list[str] = []
    longer = replace(config, epochs2=5, base_layers=None)
    run = open_run(tmp_path / "run", True, longer, SimpleNamespace(root=tmp_path / "data", name="data"), lines.append)
    assert run.config.epochs2 == 5 and run.config.base_layers == 19
    assert lines == [f"{tmp_path / 'run'}: continuing with epochs2=5 (was 2)"]


def test_resuming_with_another_patience_says_a_stage_that_stopped_early_stays_stopped(tmp_path: Path) -> None:
    # Before: "continuing with patience=5 (was 1)" and nothing more, though stage 1, stopped early under patience 1,
    # does not train again.
    config = _saved_config(tmp_path, patience=1)
    (tmp_path / "run").mkdir()
    state = RunState()
    state.stages[1].epochs_run, state.stages[1].stopped_early = 2, True
    Run(tmp_path / "run", config, state, print).save_state()
    lines: list[str] = []
    scan = SimpleNamespace(root=tmp_path / "data", name="data")
    open_run(tmp_path / "run", True, replace(config, patience=5, base_layers=None), scan, lines.append)
    assert lines == [f"{tmp_path / 'run'}: continuing with patience=5 (was 1) (stage 1 stopped early: that stays)"]
    lines.clear()
    open_run(tmp_path / "run", True, replace(config, epochs2=5, base_layers=None), scan, lines.append)
    assert lines == [f"{tmp_path / 'run'}: continuing with epochs2=5 (was 2)"]



def test_resume_continues_with_the_runs_own_options_unless_given_again(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: `finetune DATA --out RUN --resume`, the README's own example, took every option left out at its
    # default: a run started with --epochs1 3 --epochs2 1 logged "continuing with epochs1=20 (was 3), epochs2=30
    # (was 1)" and trained 50 epochs, and one started with another backbone or learning rate was refused
    # ("resume with the original options").
    data = make_dataset(tmp_path / "tiny", per_class=12)
    out = tmp_path / "run"
    started = dict(backbone="vgg16", weights="none", epochs1=3, epochs2=1, unfreeze_top=2, lr1=2e-3, lr2=1e-4,
                   batch_size=4, image_size=32, augment=True, seed=TRAINABLE_SEED, ratios=(0.5, 0.25, 0.25),
                   patience=2)
    opened: list[RunConfig] = []

    def capture(out: Path, resume: bool, config: RunConfig, scan: object, log: object) -> None:
        opened.append(config)
        raise Interrupted("captured")

    monkeypatch.setattr(ft, "open_run", capture)
    with pytest.raises(Interrupted):
        ft.finetune(data, out=out, **started, **QUIET)
    out.mkdir()
    Run(out, opened[0], RunState(), print).save_state()
    with pytest.raises(Interrupted):
        ft.finetune(data, out=out, resume=True, **QUIET)
    assert opened[1] == opened[0]
    finetune_cli(data, "--out", out, "--resume", "--epochs2", "4")
    assert opened[2] == replace(opened[0], epochs2=4)
    with pytest.raises(Interrupted):
        ft.finetune(data, out=out, **QUIET)  # a new run: the defaults
    assert (opened[3].backbone, opened[3].epochs1, opened[3].lr1) == ("efficientnet_lite0", 20, 1e-3)

def test_resuming_an_unfinished_run_with_fewer_epochs_than_it_ran_is_refused(tmp_path: Path) -> None:
    # Before: a run interrupted after 3 of `epochs1=4` epochs, resumed with `epochs1=2`, kept all 3, went on to
    # stage 2 and reported "stage 1 3/2 epochs", after saying "continuing with epochs1=2".
    config = _saved_config(tmp_path, epochs1=4)
    (tmp_path / "run").mkdir()
    state = RunState()
    state.stages[1].epochs_run = 3
    Run(tmp_path / "run", config, state, print).save_state()
    scan = SimpleNamespace(root=tmp_path / "data", name="data")
    with pytest.raises(TlfeatError, match=r"^`epochs1=2`: .* has already run 3 epochs of stage 1; .* at least 3"):
        open_run(tmp_path / "run", True, replace(config, epochs1=2, base_layers=None), scan, print)
    run = open_run(tmp_path / "run", True, replace(config, epochs1=3, epochs2=1, base_layers=None), scan, print)
    assert (run.config.epochs1, run.config.epochs2) == (3, 1)  # stage 2 has run none: any count is honoured


def test_resuming_with_more_stage_1_epochs_once_stage_2_has_begun_is_refused(tmp_path: Path) -> None:
    # Before: a run interrupted in stage 2 epoch 2 (of --epochs1 2 --epochs2 2) and resumed with --epochs1 4 ran
    # "stage 1" epochs 3-4 on the stage-2 checkpoint (its unfrozen layers, its 1e-5 optimizer) while logging
    # "base frozen, head trains ... lr 0.001", then stage 2 again: history.csv read stages 1, 1, 2, 1, 1, 2.
    config = _saved_config(tmp_path)
    state = RunState()
    state.stages[1].epochs_run, state.stages[2].epochs_run = 2, 1
    (tmp_path / "run").mkdir()
    Run(tmp_path / "run", config, state, print).save_state()
    scan = SimpleNamespace(root=tmp_path / "data", name="data")
    with pytest.raises(TlfeatError, match=r"^`epochs1=4`: .* has begun stage 2, .* resume with `epochs1=2`"):
        open_run(tmp_path / "run", True, replace(config, epochs1=4, base_layers=None), scan, print)
    assert open_run(tmp_path / "run", True, replace(config, epochs2=5, base_layers=None), scan, print).config.epochs2 == 5
    state.stages[1].stopped_early = True  # stage 1 stopped early: more epochs would not have run it longer
    Run(tmp_path / "run", config, state, print).save_state()
    assert open_run(tmp_path / "run", True, replace(config, epochs1=4, base_layers=None), scan, print).config.epochs1 == 4


def test_resuming_on_a_dataset_whose_files_changed_says_so(tmp_path: Path) -> None:
    # Before: one image added to the dataset was refused as "was started with other settings (dataset_fingerprint
    # '4cc55d3b3310ba394912... vs '8443e462d49a3e94b28f...); resume with the original options": the options were.
    config = _saved_config(tmp_path)
    (tmp_path / "run").mkdir()
    Run(tmp_path / "run", config, RunState(), print).save_state()
    scan = SimpleNamespace(root=tmp_path / "data", name="data")
    with pytest.raises(TlfeatError, match=r"the images of .*data are not those this run started on .* restore them"):
        open_run(tmp_path / "run", True, replace(config, dataset_fingerprint="g", base_layers=None), scan, print)
    with pytest.raises(TlfeatError, match=r"other settings \(seed 1 vs 0; dataset_fingerprint 'g' vs 'f' \["):
        open_run(tmp_path / "run", True, replace(config, seed=1, dataset_fingerprint="g", base_layers=None), scan,
                 print)


def test_resuming_under_another_keras_backend_is_refused(tmp_path: Path) -> None:
    # Before: a run of 3 epochs under TensorFlow, resumed with KERAS_BACKEND=jax, trained on under JAX without a
    # word (other dropout draws and kernels than the run it claims to continue) and its summary said "jax".
    config = RunConfig(backbone="vgg16", weights="imagenet", weights_identity="w", preprocessing="caffe",
                       image_size=32, unfreeze_top=2, epochs1=4, epochs2=2, lr1=1e-3, lr2=1e-4, batch_size=4,
                       augment=False, patience=0, seed=0, split_ratios=[0.5, 0.25, 0.25],
                       dataset_root=str(tmp_path / "data"), dataset_fingerprint="f", classes=["a", "b"],
                       base_layers=19, keras_backend="tensorflow")
    scan = SimpleNamespace(root=tmp_path / "data", name="data")
    (tmp_path / "run").mkdir()
    Run(tmp_path / "run", config, RunState(), print).save_state()
    with pytest.raises(TlfeatError, match=r"keras_backend 'jax' vs 'tensorflow' \[now vs run\].*KERAS_BACKEND=tens"):
        open_run(tmp_path / "run", True, replace(config, keras_backend="jax", base_layers=None), scan, print)
    (tmp_path / "old").mkdir()  # a run from before the backend was recorded resumes as before
    Run(tmp_path / "old", replace(config, keras_backend=None), RunState(), print).save_state()
    assert open_run(tmp_path / "old", True, replace(config, base_layers=None), scan, print).config.base_layers == 19


def test_each_epoch_reseeds_generators_of_any_state_dtype() -> None:
    # Before: under torch every fine-tune crashed at its first epoch ("OverflowError: Python integer 3831201730 out
    # of bounds for int32"): Keras' seed generator state is int32 there, uint32 under JAX and TensorFlow.
    from tlfeat.finetuning.model import reseed

    class State:
        name = "seed_generator_state"

        def __init__(self, dtype: str) -> None:
            self.dtype, self.value = dtype, None

        def assign(self, value: np.ndarray) -> None:
            self.value = value

    states = [State("int32"), State("uint32"), State("int32")]
    reseed(SimpleNamespace(variables=states), seed=0, epoch=0)  # its first two starts are above 2**31
    expected = [int(np.random.SeedSequence((0, 0, i + 1)).generate_state(1)[0]) for i in range(3)]
    assert [int(s.value[0]) for s in states] == [expected[0] % 2**31, expected[1], expected[2] % 2**31]
    assert expected[0] >= 2**31 and expected[1] >= 2**31


def test_a_second_run_on_a_busy_folder_stops_before_building_its_model(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: the run's lock was taken after its model was built or loaded (minutes for a large backbone), so a
    # second run on the same --out was refused only then, and a new run was told the folder "is not empty".
    data = make_dataset(tmp_path / "tiny", per_class=4)
    out = tmp_path / "run"

    def built(*args: object) -> None:
        raise AssertionError("a model was built while another run held the folder")

    monkeypatch.setattr(ft, "_load_or_build", built)
    with run_lock(out):  # a live run holds it
        assert_one_line_error(finetune_cli(*vgg16_args(data, out)), "run.lock", "another tlfeat run")
        monkeypatch.setattr(ft, "open_run", lambda out, resume, config, scan, log: Run(Path(out), config, RunState(), log))
        with pytest.raises(TlfeatError, match="another tlfeat run"):
            ft.finetune(data, backbone="vgg16", weights="none", image_size=32, seed=TRAINABLE_SEED, out=out,
                        resume=True, **QUIET)
    assert not any(out.iterdir())  # the refused runs wrote nothing, and the holder's lock file went with it


def test_a_new_run_on_a_folder_a_live_run_writes_is_told_to_wait(tmp_path: Path) -> None:
    # Before: told "holds a fine-tune run; pass --resume to continue it", which then met the live run's lock.
    data = make_dataset(tmp_path / "tiny", per_class=4)
    out = tmp_path / "run"
    with run_lock(out):  # a live run, past its first epoch
        (out / "state.json").write_text("{}")
        assert_one_line_error(finetune_cli(*vgg16_args(data, out)), "run.lock", "another tlfeat run")
    assert_one_line_error(finetune_cli(*vgg16_args(data, out)), "holds a fine-tune run", "--resume")  # once it ended
