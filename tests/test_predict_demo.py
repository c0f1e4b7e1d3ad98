"""predict on real image files (features from a real extraction), its refusals, and the offline demo."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from conftest import assert_one_line_error, extract_run_counts, make_dataset, make_image, summary_rows
from tlfeat.cache import load
from tlfeat.apps.demo import write_digits
from tlfeat.extraction.run import extract
from tlfeat.heads.fit import fit_heads, load_features
from tlfeat.heads.registry import HEAD_NAMES
from tlfeat.heads.store import load_head, read_metadata, save_head
from tlfeat.apps.evaluate import evaluate_on_caches
from tlfeat.apps.predict import predict_images
from tlfeat.errors import TlfeatError

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Generated images embedded by EfficientNet-Lite0 (random weights, two image sizes), logreg heads on them."""
    root = tmp_path_factory.mktemp("predict")
    data = make_dataset(root / "data", n_classes=3, per_class=12)
    caches = [
        extract(data, out=root / f"small-{size}.h5", weights="none", image_size=size, progress=False).out
        for size in (32, 40)
    ]
    single = fit_heads(caches[:1], head="logreg", out=root / "single")
    fused = fit_heads(caches, head="logreg", out=root / "fused")
    assert single.results[0].scores["test"]["accuracy"] == 1.0  # the classes differ in colour: easy
    return {
        "root": root, "data": data, "caches": caches,
        "single": single.results[0].files["model"], "fused": fused.results[0].files["model"],
    }


def _expected_proba(model: Path, caches: list[Path]) -> dict[str, np.ndarray]:
    """Each image's probabilities from the cached (fused) features: what predict must reproduce."""
    estimator, _ = load_head(model)
    features = load_features(caches).data
    return dict(zip(features.paths, estimator.predict_proba(features.features)))


@pytest.mark.parametrize("kind", ["single", "fused"])
@pytest.mark.slow
def test_predict_reproduces_the_cached_features(trained: dict, kind: str) -> None:
    caches = trained["caches"][:1] if kind == "single" else trained["caches"]
    expected = _expected_proba(trained[kind], caches)
    result = predict_images(trained[kind], [trained["data"]], top=3)
    assert len(result.predictions) == len(expected) == 36 and not result.skipped
    classes = result.meta["classes"]
    for prediction in result.predictions:
        relpath = Path(prediction.path).relative_to(trained["data"]).as_posix()
        got = dict(prediction.top)
        np.testing.assert_allclose([got[c] for c in classes], expected[relpath], atol=1e-4)
        assert prediction.top[0][0] == relpath.split("/")[0]  # and it is right


def test_predict_cli_prints_top_k_lists_skipped_and_writes_csv(trained: dict, tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    for image in sorted(trained["data"].glob("class_*/img_00[0-1].png")):
        (folder / f"{image.parent.name}-{image.name}").write_bytes(image.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "notes.txt").write_text("not an image, not even tried")
    (folder / ".hidden.png").write_bytes(b"")
    out_csv = tmp_path / "pred.csv"
    result = runner.invoke(
        app, ["predict", str(trained["single"]), str(folder), "--top", "2", "--csv", str(out_csv), "-q"],
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 6
    for line in lines:
        path, first, second = line.split("\t")
        assert Path(path).name.split("-")[0] == first.split(" ")[0]
        assert float(first.split(" ")[1]) >= float(second.split(" ")[1])
    assert "skipped " + str(folder / "broken.png") + ": corrupt or truncated image data" in result.stderr
    assert "notes.txt" not in result.output and ".hidden" not in result.output

    with open(out_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "class", "probability", "class_2", "probability_2", "skipped"]
    assert len(rows) == 7 and sum(1 for r in rows if r["skipped"]) == 1
    assert all(r["class"] == Path(r["path"]).name.split("-")[0] for r in rows if not r["skipped"])



def test_predict_top_beyond_the_classes_writes_one_column_pair_per_class(trained: dict, tmp_path: Path) -> None:
    # Before: --top 10 on this 3-class head wrote class_4 .. class_10 columns, always empty.
    out_csv = tmp_path / "pred.csv"
    image = next(trained["data"].glob("class_0/*.png"))
    result = predict_images(trained["single"], [image], top=10, csv=out_csv, progress=False)
    assert len(result.predictions[0].top) == 3
    with open(out_csv, newline="") as handle:
        headers = next(csv.reader(handle))
    assert headers == ["path", "class", "probability", "class_2", "probability_2", "class_3", "probability_3",
                       "skipped"]

def test_predict_names_a_path_that_does_not_exist(trained: dict, tmp_path: Path) -> None:
    good = str(next(trained["data"].glob("class_0/*.png")))
    absent = tmp_path / "absent.jpg"
    for images in ([good, str(absent)], [str(absent)]):
        result = runner.invoke(app, ["predict", str(trained["single"]), *images, "-q"])
        assert_one_line_error(result, str(absent), "not found")
        assert not result.stdout


def test_predict_refuses_unreadable_or_foreign_model_files(trained: dict, tmp_path: Path) -> None:
    image = str(next(trained["data"].glob("class_0/*.png")))
    truncated = tmp_path / "truncated.skops"
    truncated.write_bytes(trained["single"].read_bytes()[:-100])
    assert_one_line_error(runner.invoke(app, ["predict", str(truncated), image]), "truncated.skops")

    foreign = tmp_path / "foreign.skops"
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr("schema.json", "{}")
    assert_one_line_error(runner.invoke(app, ["predict", str(foreign), image]), "foreign.skops", "not a tlfeat head")
    assert_one_line_error(runner.invoke(app, ["predict", str(tmp_path / "none.skops"), image]), "none.skops", "not found")


def test_predict_refuses_features_from_other_weights(trained: dict, tmp_path: Path) -> None:
    estimator, meta = load_head(trained["single"])
    meta["sources"][0]["weights"] = "sha256:0123"  # as if fitted on features from another weights file
    model = tmp_path / "logreg.skops"
    save_head(estimator, model, meta, {})
    image = str(next(trained["data"].glob("class_0/*.png")))
    assert_one_line_error(
        runner.invoke(app, ["predict", str(model), image]), "logreg.skops", "weights sha256:0123", "refusing to mix"
    )


@pytest.mark.parametrize("recorded", ["pillow-bilinear", None])  # the old decoding, or none recorded (older)
def test_predict_refuses_a_head_fitted_on_features_decoded_the_old_way(
    trained: dict, tmp_path: Path, recorded: str | None
) -> None:
    # Before: predict decoded large JPEGs at reduced scale for a head fitted on full-scale decodes, silently.
    estimator, meta = load_head(trained["single"])
    meta["sources"][0]["decode"] = recorded
    model = tmp_path / "logreg.skops"
    save_head(estimator, model, meta, {})
    image = str(next(trained["data"].glob("class_0/*.png")))
    assert_one_line_error(
        runner.invoke(app, ["predict", str(model), image]), "logreg.skops", "decoded as 'pillow-bilinear'",
        "extract (and fit) again",
    )


def test_predict_with_nothing_readable_is_an_error(trained: dict, tmp_path: Path) -> None:
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8 not really a jpeg")
    assert_one_line_error(
        runner.invoke(app, ["predict", str(trained["single"]), str(junk), "-q"]),
        f"{junk}: not an image Pillow can read", "none of the 1 files could be read as an image",
    )
    # Before: Python's predict returned an empty result, and only the command wrote --csv and said it was empty.
    other = tmp_path / "other.jpg"
    other.write_bytes(b"")
    listed = tmp_path / "p.csv"
    with pytest.raises(TlfeatError, match=rf"none of the 2 files could be read as an image; 1 more skipped, listed in {listed}$"):
        predict_images(trained["single"], [junk, other], csv=listed, progress=False)
    assert len(listed.read_text().splitlines()) == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(runner.invoke(app, ["predict", str(trained["single"]), str(empty)]), "no image files")


def test_evaluate_scores_a_head_on_caches_as_fit_head_did(trained: dict, tmp_path: Path) -> None:
    for kind, caches in (("single", trained["caches"][:1]), ("fused", trained["caches"])):
        out_json = tmp_path / f"{kind}.json"
        result = runner.invoke(app, ["evaluate", str(trained[kind]), *map(str, caches), "--json", str(out_json)])
        assert result.exit_code == 0, result.output
        recorded = read_metadata(trained[kind])["scores"]
        written = json.loads(out_json.read_text())["splits"]
        assert {s: written[s]["n"] for s in written} == {s: recorded[s]["n"] for s in recorded}
        for split, scores in recorded.items():
            assert written[split]["accuracy"] == pytest.approx(scores["accuracy"])
            assert f"| {split} | {scores['n']} |" in result.stdout
    only_test = runner.invoke(app, ["evaluate", str(trained["single"]), str(trained["caches"][0]), "--split", "test"])
    assert only_test.exit_code == 0 and "| test |" in only_test.stdout and "| train |" not in only_test.stdout


def test_evaluate_refuses_caches_the_head_was_not_fitted_on(trained: dict, tmp_path: Path) -> None:
    single, (small, larger) = str(trained["single"]), map(str, trained["caches"])
    assert_one_line_error(
        runner.invoke(app, ["evaluate", single, larger]), "small-40.h5", "input_size 40", "input_size 32"
    )
    assert_one_line_error(
        runner.invoke(app, ["evaluate", str(trained["fused"]), small]), "fitted on 2 cache(s)", "not 1"
    )
    assert_one_line_error(  # before: "extract with the same settings", when the caches were only swapped
        runner.invoke(app, ["evaluate", str(trained["fused"]), larger, small]),
        "in the order it was fitted on them (small-32.h5, small-40.h5)",
    )
    assert_one_line_error(  # a folder of heads is not a fine-tune run: the message names a head file in it
        runner.invoke(app, ["predict", str(Path(trained["fused"]).parent), small]), "a folder of heads", "logreg.skops"
    )
    four = make_dataset(tmp_path / "four", n_classes=4, per_class=8)
    other_classes = extract(four, out=tmp_path / "four.h5", weights="none", image_size=32, progress=False).out
    assert_one_line_error(
        runner.invoke(app, ["evaluate", single, str(other_classes)]),
        "four.h5", "class list differs", "4 vs 3 classes", "class_3",
    )
    assert_one_line_error(
        runner.invoke(app, ["evaluate", single, small, "--split", "holdout"]), "--split holdout: use train, val or test"
    )


def test_evaluate_on_a_re_split_extraction_scores_only_unseen_images(trained: dict, tmp_path: Path) -> None:
    """The issue's case: the same images extracted again with another split seed; most "val" rows were trained on."""
    resplit = extract(trained["data"], out=tmp_path / "seed5.h5", weights="none", image_size=32, seed=5,
                      progress=False).out
    original, other = load(trained["caches"][0]), load(resplit)
    trained_paths = set(original.paths[original.split == "train"])
    unseen = {s: int(sum(p not in trained_paths for p in other.paths[other.split == s])) for s in ("val", "test")}
    assert unseen["val"] < int(np.sum(other.split == "val"))  # the re-split put training images into val
    result = runner.invoke(app, ["evaluate", str(trained["single"]), str(resplit)])
    assert result.exit_code == 0, result.output
    for split, n in unseen.items():
        assert f"| {split} | {n} |" in result.stdout
    assert "note: val: " in result.stderr and "rows are rows logreg.skops was fitted on" in result.stderr


def test_demo_names_its_dataset_before_the_extraction_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: "dataset cache/digits/ (1797 PNGs written)" came after extract's progress bar, as if it were written
    # by the extraction.
    from tlfeat.apps import demo

    events: list[str] = []

    def stop_at_extract(dataset: Path, **_: object) -> None:
        events.append("extract")
        raise TlfeatError("stopped here")

    monkeypatch.setattr(demo, "write_digits", lambda root: 1797)
    monkeypatch.setattr(demo, "extract", stop_at_extract)
    result = runner.invoke(app, ["demo", "--out", str(tmp_path), "-q"])
    assert result.exit_code == 1, result.output
    assert result.stdout.splitlines() == [f"dataset {tmp_path / 'digits'}/ (1797 PNGs written)"]
    with pytest.raises(TlfeatError, match="stopped here"):
        demo.run_demo(tmp_path, progress=False, on_dataset=lambda path, n: events.append(f"dataset {n}"))
    assert events == ["extract", "dataset 1797", "extract"]


@pytest.mark.slow
def test_demo_runs_offline_end_to_end_and_reruns_from_the_cache(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "1797 PNGs written" in lines[0] and extract_run_counts(lines[1]) == (1797, 1797, 0, 0)
    assert lines[3].startswith("logreg")  # the dataset and its cache come first, then one line per head
    assert len(list((out / "digits").glob("*/*.png"))) == 1797
    assert sorted(p.name for p in (out / "digits").iterdir()) == [str(d) for d in range(10)]

    heads = out / "heads" / "digits-efficientnet_lite0"
    rows = summary_rows(heads)
    assert set(rows) == set(HEAD_NAMES)
    # ImageNet features of upscaled 8x8 scans: linear heads are well above 90%, every head far above chance (10%).
    assert float(rows["logreg"]["test acc"]) > 0.9
    assert float(rows["linear-svm"]["test acc"]) > 0.9
    assert min(float(r["test acc"]) for r in rows.values()) > 0.6
    assert (heads / "logreg.confusion.png").is_file()
    assert len(load(out / "digits-efficientnet_lite0.h5", split="test")) > 400

    # A rerun writes no PNG and embeds nothing: extraction is incremental.
    assert write_digits(out / "digits") == 0
    assert extract(out / "digits", out=out / "digits-efficientnet_lite0.h5", progress=False).n_computed == 0


def test_folders_of_images_to_predict_are_walked_as_the_scan_walks_them(tmp_path: Path) -> None:
    # Before: os.walk without followlinks left out symlinked sub-folders, without a word, and a pipe named like
    # a JPEG hung predict and similar forever.
    import os

    from tlfeat.apps.predict import collect_images

    real = tmp_path / "real"
    real.mkdir()
    make_image(real / "b.png", 0, 1)
    query = tmp_path / "q"
    query.mkdir()
    make_image(query / "a.png", 0, 0)
    (query / "link").symlink_to(real)
    (query / "loop").symlink_to(query)
    os.mkfifo(query / "pipe.jpg")
    (query / ".hidden.png").write_bytes(b"x")
    (query / "gone.png").symlink_to(tmp_path / "missing.png")
    assert collect_images([query]) == ([query / "a.png", query / "link" / "b.png"], [
        (str(query / "gone.png"), "broken symlink (its target is missing)"), (str(query / "loop"), "symlink loop (a folder that contains itself)"),
        (str(query / "pipe.jpg"), "not a regular file")])
    with pytest.raises(TlfeatError, match=r"pipe\.jpg: not a regular file"):
        collect_images([query / "pipe.jpg"])


def test_file_names_that_break_lines_or_utf8_stay_one_field(trained: dict, tmp_path: Path) -> None:
    # Before: a tab or newline in a file name split predict's tab-separated line, and a name that is not UTF-8
    # ended --csv in a UnicodeEncodeError traceback with no CSV written.
    import os

    source = next(trained["data"].glob("class_0/*.png")).read_bytes()
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "tab\there.png").write_bytes(source)
    (folder / "back\\tslash.png").write_bytes(source)  # a literal backslash: doubled, told apart from a tab
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.png"), "wb") as handle:
        handle.write(source)
    listed = tmp_path / "p.csv"
    result = runner.invoke(app, ["predict", str(trained["single"]), str(folder), "--csv", str(listed), "-q"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith(str(folder))]
    assert [line.split("\t")[0] for line in lines] == [
        f"{folder}/back\\\\tslash.png", f"{folder}/caf\\xe9.png", f"{folder}/tab\\there.png"]
    with open(listed, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["path"] for row in rows) == [
        f"{folder}/back\\tslash.png", f"{folder}/caf\\xe9.png", f"{folder}/tab\there.png"]


def test_a_head_on_another_backends_random_weights_names_the_backend(tmp_path: Path) -> None:
    # Before: "extract with the same settings" (evaluate) and "weights none are now none:tensorflow" (predict):
    # the setting that differs is KERAS_BACKEND, which neither named.
    import h5py

    from conftest import write_synthetic_cache
    from tlfeat.backbones import get_backbone

    fitted_on, other = write_synthetic_cache(tmp_path / "j.h5"), write_synthetic_cache(tmp_path / "t.h5")
    for path, weights in ((fitted_on, "none:jax"), (other, "none:tensorflow")):
        with h5py.File(path, "r+") as handle:
            handle.attrs["weights"] = weights
            handle.attrs["preprocessing"] = get_backbone("efficientnet_lite0").preprocessing
    fit_heads(fitted_on, head="logreg", out=tmp_path / "heads")
    model = tmp_path / "heads" / "logreg.skops"
    with pytest.raises(TlfeatError, match=r"extract under KERAS_BACKEND=jax \(random weights differ by backend\)$"):
        evaluate_on_caches(model, other)
    photo = tmp_path / "photo.png"
    make_image(photo, 0, 0)
    with pytest.raises(TlfeatError, match=r"random weights under the jax Keras backend, .* set KERAS_BACKEND=jax"):
        predict_images(model, photo, progress=False)
