"""Analyses on cached embeddings: planted duplicates and label errors are found, similar-image search, maps, bad caches.

The planted dataset is generated (shapes whose kind and colour depend on the
class, positions and background on the image), embedded once per module with
the offline EfficientNet-Lite0 ImageNet weights.
"""

from __future__ import annotations

import re
import csv
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app
from conftest import assert_one_line_error, gaussian_blobs, plant_features, write_synthetic_cache
from tlfeat.analysis import audit, choose_threshold, embedding_map, exact_top_k, find_duplicates, review_labels, similar
from tlfeat.analysis.common import open_cache
from tlfeat.analysis.duplicates import KIND_ORDER
from tlfeat.analysis.search import index_path
from tlfeat.cache import CacheKey, load
from tlfeat.cache_writer import write_cache
from tlfeat.errors import TlfeatError
from tlfeat.extraction.run import extract
from tlfeat.heads.fit import fit_heads

PNG = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()
HUES = [(200, 60, 40), (40, 160, 60), (50, 80, 200), (220, 200, 40)]


def scene_image(class_index: int, variant: int, size: int = 96) -> Image.Image:
    """Class: colour and kind of shape (discs, bars, diagonals); image: their number, places and sizes, background."""
    rng = np.random.default_rng(7919 * class_index + variant)
    y, x = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, np.pi)
    background = 0.5 + 0.5 * np.cos(2 * np.pi * rng.uniform(0.5, 2) * (x * np.cos(angle) + y * np.sin(angle)))
    pixels = background[..., None] * rng.uniform(0.3, 0.7) * 255 * np.ones(3)
    for _ in range(rng.integers(3, 7)):
        cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.08, 0.25)
        shape = class_index % 3
        if shape == 0:
            mask = (x - cx) ** 2 + (y - cy) ** 2 < r**2
        elif shape == 1:
            mask = (abs(x - cx) < r) & (abs(y - cy) < r / 2)
        else:
            mask = abs((x - cx) + (y - cy)) < r / 3
        pixels[mask] = np.array(HUES[class_index], float) * rng.uniform(0.6, 1.0)
    pixels += rng.normal(0, 3, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@dataclass
class Planted:
    root: Path
    cache: Path
    duplicates: set[tuple[str, str]]  # (train path, test path) copies across splits
    within: tuple[str, str]  # a copy inside the test split
    moved: list[str]  # images put in a wrong class folder


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Planted:
    root = tmp_path_factory.mktemp("planted") / "data"
    for c in range(len(HUES)):
        for v in range(22):
            split = "train" if v < 16 else "test"
            path = root / split / f"class_{c}" / f"img_{v:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            scene_image(c, v).save(path)
    duplicates = set()
    for c in range(len(HUES)):
        source = f"train/class_{c}/img_000.png"
        shutil.copy(root / source, root / f"test/class_{c}/copy_of_000.png")
        resized = Image.open(root / f"train/class_{c}/img_001.png").resize((120, 120), Image.BICUBIC)
        resized.save(root / f"test/class_{c}/resized_001.png")
        duplicates |= {(source, f"test/class_{c}/copy_of_000.png"),
                       (f"train/class_{c}/img_001.png", f"test/class_{c}/resized_001.png")}
    shutil.copy(root / "test/class_2/img_020.png", root / "test/class_2/copy_of_020.png")
    moved = []
    for c, v in [(0, 2), (0, 3), (1, 2), (2, 2), (3, 2)]:
        target = f"train/class_{(c + 1) % len(HUES)}/moved_from_{c}_{v}.png"
        shutil.move(root / f"train/class_{c}/img_{v:03d}.png", root / target)
        moved.append(target)
    cache = root.parent / "planted.h5"
    extract(root, cache, backbone="efficientnet_lite0", weights="imagenet", progress=False)
    return Planted(root, cache, duplicates, ("test/class_2/copy_of_020.png", "test/class_2/img_020.png"), moved)


def dataset_files(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_audit_finds_planted_duplicates_test_leaks_first_and_label_errors(planted: Planted, tmp_path: Path) -> None:
    before = dataset_files(planted.root)
    result = audit(planted.cache, out=tmp_path / "audit")
    pairs = result.duplicates.pairs
    found = {(p.path_a, p.path_b) for p in pairs}
    assert len(planted.duplicates & found) >= 0.9 * len(planted.duplicates), (found, result.duplicates.threshold_rule)
    assert tuple(sorted(planted.within)) in {tuple(sorted(f)) for f in found}
    kinds = [p.kind for p in pairs]
    assert kinds == sorted(kinds, key=KIND_ORDER.index) and kinds[0] == "test leak"
    byte_copies = {pair for pair in planted.duplicates if "copy_of" in pair[1]} | {planted.within}
    assert {(p.path_a, p.path_b) for p in pairs if p.same_bytes} == byte_copies

    suspects = {result.data.paths[r] for r in result.labels.order[: 2 * len(planted.moved)]}
    assert len(suspects & set(planted.moved)) >= 0.8 * len(planted.moved), suspects
    flagged = read_csv(tmp_path / "audit" / "label_issues.csv")
    assert list(flagged[0]) == ["path", "split", "given_label", "suggested_label", "score"]
    scores = [float(row["score"]) for row in flagged]
    assert scores == sorted(scores)
    moved_rows = [row for row in flagged if row["path"] in planted.moved]
    assert moved_rows and all(row["suggested_label"] != row["given_label"] for row in moved_rows)

    rows = read_csv(tmp_path / "audit" / "duplicates.csv")
    assert list(rows[0])[:5] == ["path_a", "path_b", "split_a", "split_b", "similarity"]
    assert rows[0]["split_b"] == "test" and rows[0]["split_a"] != "test"
    for name in ("duplicates.png", "label_issues.png", "confusion.png", "similarity.png"):
        assert (tmp_path / "audit" / name).read_bytes()[:8] == PNG
    summary = (tmp_path / "audit" / "summary.md").read_text()
    assert f"Threshold {result.duplicates.threshold:.3f}" in summary and "test leak" in summary
    assert dataset_files(planted.root) == before  # nothing written inside the dataset


def test_similar_returns_an_images_copy_first(planted: Planted, tmp_path: Path) -> None:
    outside = tmp_path / "query.png"
    shutil.copy(planted.root / "train/class_1/img_005.png", outside)
    inside = planted.root / "train/class_0/img_000.png"
    result = similar(planted.cache, ["train/class_3/img_000.png", outside, inside], top=3, out=tmp_path / "similar")
    # In the order given (before: the cached ones first, then those embedded)
    assert [q.query for q in result.queries] == ["train/class_3/img_000.png", str(outside), str(inside)]
    by_query = {q.query: q for q in result.queries}
    cached = by_query["train/class_3/img_000.png"]
    assert cached.row is not None and cached.matches[0].path == "test/class_3/copy_of_000.png"
    assert cached.matches[0].similarity == pytest.approx(1.0, abs=1e-5) and cached.matches[0].similarity <= 1.0
    assert all(m.row != cached.row for m in cached.matches)  # a cached query never returns itself
    embedded = by_query[str(outside)]
    assert embedded.row is None and embedded.matches[0].path == "train/class_1/img_005.png"
    assert embedded.matches[0].similarity > 0.999
    assert by_query[str(inside)].matches[0].path == "test/class_0/copy_of_000.png"
    files = result.files  # before: the Python function wrote nothing (only the CLI did)
    assert files == [tmp_path / "similar" / "similar.csv", tmp_path / "similar" / "similar.png"]
    assert files[1].read_bytes()[:8] == PNG and len(read_csv(files[0])) == 9


def test_a_stored_path_that_is_also_another_local_file_is_refused_as_ambiguous(
    planted: Planted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the local file was ignored without a word and the stored image's neighbours came back.
    local = tmp_path / "train" / "class_3" / "img_000.png"
    local.parent.mkdir(parents=True)
    shutil.copy(planted.root / "train/class_1/img_005.png", local)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TlfeatError, match="both an image path stored in the cache and another file here; give ./"):
        similar(planted.cache, "train/class_3/img_000.png", out=tmp_path / "s")
    here = similar(planted.cache, "./train/class_3/img_000.png", top=1, out=tmp_path / "s")
    assert here.queries[0].row is None and here.queries[0].matches[0].path == "train/class_1/img_005.png"
    monkeypatch.chdir(planted.root)  # inside the dataset the two are one file: the stored row
    assert similar(planted.cache, "train/class_3/img_000.png", top=1, out=tmp_path / "s").queries[0].row is not None


def test_similar_refuses_to_embed_for_a_cache_whose_weights_differ(planted: Planted, tmp_path: Path) -> None:
    changed = tmp_path / "changed.h5"
    shutil.copy(planted.cache, changed)
    with h5py.File(changed, "r+") as handle:
        handle.attrs["weights"] = "sha256:0123"
    assert similar(changed, ["train/class_0/img_004.png"], top=1).queries[0].matches  # cached rows need no embedding
    outside = tmp_path / "x.png"
    shutil.copy(planted.root / "train/class_0/img_004.png", outside)
    with pytest.raises(TlfeatError, match="refusing to mix"):
        similar(changed, [outside], top=1)


def test_similar_query_must_exist(planted: Planted) -> None:
    with pytest.raises(TlfeatError, match="neither an image path stored in the cache nor an existing file"):
        similar(planted.cache, ["train/class_9/nothing.png"])


def test_an_unreadable_query_names_its_file_and_why(planted: Planted, tmp_path: Path) -> None:
    # Before: "none of the 1 query files could be read as an image", neither the file nor the reason.
    broken = tmp_path / "broken.png"
    broken.write_bytes((planted.root / "train/class_0/img_004.png").read_bytes()[:40])
    expected = rf"^{re.escape(str(broken))}: not an image Pillow can read; no query image to search with$"
    with pytest.raises(TlfeatError, match=expected):
        similar(planted.cache, [broken])


def test_exact_top_k_blocked_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    base, queries = rng.normal(size=(50, 8)).astype(np.float32), rng.normal(size=(9, 8)).astype(np.float32)
    base[7] = 0.0  # an all-zero row: similarity 0 to everything
    exclude = np.array([3, -1, 5, -1, -1, -1, -1, -1, 49])
    found = exact_top_k(queries, base, 6, exclude=exclude, block_rows=7, query_rows=4)
    unit = base / np.maximum(np.linalg.norm(base, axis=1, keepdims=True), 1e-30)
    sims = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ unit.T
    sims[np.arange(9)[exclude >= 0], exclude[exclude >= 0]] = -np.inf
    np.testing.assert_array_equal(found.indices, np.argsort(-sims, axis=1, kind="stable")[:, :6])
    np.testing.assert_allclose(found.similarities, np.sort(sims, axis=1)[:, ::-1][:, :6], atol=1e-6)
    few = exact_top_k(queries[:1], base[:3], 5)
    assert list(few.indices[0, 3:]) == [-1, -1] and np.isneginf(few.similarities[0, 3:]).all()


def blobs_with_copies(tmp_path: Path, name: str = "blobs.h5", n_per_class: int = 100) -> tuple[Path, set]:
    """Gaussian blobs whose rows 0-4 reappear (slightly perturbed) as the last five test rows."""
    features, labels = gaussian_blobs(n_per_class=n_per_class, n_classes=4, dim=32, seed=1)
    copies = [(0, len(labels) - 1 - i) for i in range(5)]
    for i, (a, b) in enumerate(copies):
        features[b] = features[a * 7] * 1.001
        copies[i] = (a * 7, b)
    path = write_synthetic_cache(tmp_path / name, features=features, n_per_class=n_per_class, n_classes=4, dim=32)
    return path, {tuple(sorted(pair)) for pair in copies}


def test_faiss_index_saved_beside_the_cache_reused_and_rebuilt_after_a_change(tmp_path: Path) -> None:
    cache, copies = blobs_with_copies(tmp_path)
    data = load(cache)
    queries = list(data.paths[:20])
    exact = similar(cache, queries, top=5, index="exact")
    first = similar(cache, queries, top=5, index="faiss")
    assert first.index_built and index_path(cache).is_file()
    # nprobe 16 covers all of this small index's cells: the same neighbours (near-ties may swap places)
    np.testing.assert_allclose([[m.similarity for m in q.matches] for q in first.queries],
                               [[m.similarity for m in q.matches] for q in exact.queries], atol=1e-5)
    assert [q.matches[0].row for q in first.queries] == [q.matches[0].row for q in exact.queries]
    assert not similar(cache, queries, top=5, index="faiss").index_built
    write_synthetic_cache(cache, features=data.features * 2, n_per_class=100, n_classes=4, dim=32)
    assert similar(cache, queries, top=5, index="faiss").index_built  # the cache changed: a new index

    with open_cache(cache) as (rows, features):
        by_faiss = find_duplicates(rows, features, cache, index="faiss")
        by_exact = find_duplicates(rows, features, cache, index="exact")
    assert {(p.a, p.b) for p in by_faiss.pairs} >= copies and {(p.a, p.b) for p in by_exact.pairs} >= copies
    # the default threshold of a faiss search comes from quantised similarities: the rule says so
    assert "from the index's approximate similarities" in by_faiss.threshold_rule
    assert "approximate" not in by_exact.threshold_rule


def test_choose_threshold_separates_copies_from_the_bulk() -> None:
    bulk = np.random.default_rng(0).uniform(0.6, 0.85, size=1000)
    threshold, rule = choose_threshold(np.concatenate([bulk, [0.999, 0.9995, 1.0]]))
    assert 0.9 <= threshold < 0.999 and "median nearest-neighbour similarity" in rule
    assert choose_threshold(np.full(50, 0.9999))[0] == 0.995  # a bulk of near-copies: clipped, still printed


def test_float16_cache_and_a_class_without_rows(tmp_path: Path) -> None:
    features, labels = gaussian_blobs(n_per_class=30, n_classes=3, dim=16, seed=0)
    path = tmp_path / "half.h5"
    write_cache(
        path, CacheKey("efficientnet_lite0", "none", 32, "synthetic", dtype="float16"), features=features,
        labels=labels, paths=[f"c/img_{i}.png" for i in range(len(labels))], split=["train"] * len(labels),
        file_size=[1] * len(labels), file_mtime_ns=[0] * len(labels),
        class_names=["a", "b", "c", "unused"], skipped=[], extra_attrs={"dataset_root": str(tmp_path / "none")},
    )
    result = audit(path, out=tmp_path / "out")
    with open_cache(path) as (_, features):
        assert features[0:5].dtype == np.float32 and features.rows(np.array([4, 0, 4])).shape == (3, 16)
    assert result.labels.probabilities.shape == (90, 4) and not result.labels.probabilities[:, 3].any()
    assert result.labels.accuracy > 0.9
    assert any("dataset folder" in note for note in result.duplicates.notes)  # no images: no sheets, said so
    # Before: "byte-identical (same sha256) 0", as if the files had been compared
    assert "byte-identical (same sha256) not checked" in result.summary and not result.duplicates.bytes_checked


def test_one_class_gets_no_label_review_but_duplicates(tmp_path: Path) -> None:
    cache = write_synthetic_cache(tmp_path / "one.h5", n_classes=1, class_names=["only"])
    result = audit(cache, out=tmp_path / "out")
    assert result.labels is None and "at least 2 classes" in result.label_note
    assert "Not reviewed" in result.summary and (tmp_path / "out" / "duplicates.csv").is_file()
    # Before: 2 classes of 1 image each read "this cache: 2 class(es) present", as if that were enough.
    pair = write_synthetic_cache(tmp_path / "pair.h5", n_per_class=1, n_classes=2, shares=(1.0,), splits=("train",))
    assert "2 classes with 2+ images each (this cache has 0)" in audit(pair, out=tmp_path / "pair").label_note


def test_bad_caches_are_refused_in_one_line(tmp_path: Path) -> None:
    nan_cache = plant_features(write_synthetic_cache(tmp_path / "nan.h5", n_per_class=10, n_classes=2, dim=8),
                               ((3, 2), np.nan))
    for analysis in (lambda: audit(nan_cache, out=tmp_path / "a"), lambda: similar(nan_cache, ["class_0/img_0001.png"]),
                     lambda: similar(nan_cache, ["class_0/img_0001.png"], index="faiss"),
                     lambda: embedding_map(nan_cache, method="pca", out=tmp_path / "m")):
        with pytest.raises(TlfeatError, match=r"nan\.h5: NaN or infinite features \(image class_0/img_0003\.png"):
            analysis()
    with pytest.raises(TlfeatError) as one_row:  # the only bad row of its block: no "and 0 more"
        audit(nan_cache, out=tmp_path / "a")
    assert str(one_row.value).split("(")[1].startswith("image class_0/img_0003.png); re-extract")
    plant_features(nan_cache, ((5, 0), np.inf))
    with pytest.raises(TlfeatError, match=r"\(image class_0/img_0003\.png and 1 other image read with it\)"):
        audit(nan_cache, out=tmp_path / "a")
    single = write_synthetic_cache(tmp_path / "single.h5", n_per_class=1, n_classes=1, shares=(1.0,), splits=("train",))
    with pytest.raises(TlfeatError, match="1 image"):
        audit(single, out=tmp_path / "b")
    with pytest.raises(TlfeatError, match="inside the dataset folder"):
        audit(write_synthetic_cache(tmp_path / "ok.h5"), out="/synthetic/audit")


def test_missing_optional_library_names_the_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "umap", None)  # what `import umap` sees when umap-learn is not installed
    cache = write_synthetic_cache(tmp_path / "c.h5")
    with pytest.raises(TlfeatError, match=r"umap-learn is not installed: pip install umap-learn"):
        embedding_map(cache, method="umap", out=tmp_path / "map")

    # Before: a missing cleanlab was reported after the duplicate search (minutes on a large cache).
    monkeypatch.setitem(sys.modules, "cleanlab", None)
    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)
    monkeypatch.setattr(sys.modules["tlfeat.analysis.audit"], "find_duplicates",
                        lambda *args, **kwargs: pytest.fail("the duplicate search ran first"))
    with pytest.raises(TlfeatError, match=r"cleanlab is not installed: pip install cleanlab"):
        audit(cache, out=tmp_path / "audit")


def test_map_marks_the_test_images_the_head_gets_wrong(tmp_path: Path) -> None:
    features, labels = gaussian_blobs(n_per_class=40, n_classes=3, dim=16, seed=0, spread=3.0)
    features[[30, 31]] = features[[0, 1]]  # two of class 0's test rows copy training rows
    cache = write_synthetic_cache(tmp_path / "hard.h5", features=features, n_per_class=40, n_classes=3, dim=16)
    fitted = fit_heads([cache], head="logreg", out=tmp_path / "heads")
    result = embedding_map(cache, method="pca", out=tmp_path / "map", head=tmp_path / "heads" / "logreg.skops")
    test = fitted.results[0].scores["test"]
    wrong = result.map.wrong(result.data.labels)
    assert wrong.sum() == round((1 - test["accuracy"]) * test["n"]) > 0
    # The rows scored are evaluate's (before: every test row, copies of training rows included)
    assert int((result.map.predicted >= 0).sum()) == test["n"] == 28
    assert any(note.startswith("test: 2 rows are rows logreg.skops was fitted or selected on") for note in result.map.notes)
    rows = read_csv(result.csv)
    assert list(rows[0]) == ["path", "split", "label", "x", "y", "predicted", "wrong"]
    assert sum(row["wrong"] == "True" for row in rows) == wrong.sum()
    assert all(row["predicted"] == "" for row in rows if row["split"] != "test")
    assert result.png.read_bytes()[:8] == PNG
    tsne = embedding_map(cache, method="tsne", out=tmp_path / "map", max_points=50)
    assert tsne.map.coords.shape == (50, 2) and "random sample of 50" in tsne.map.notes[0]


@pytest.mark.parametrize("max_train_rows", [50_000, 60])
def test_review_labels_ranks_flipped_labels_first(tmp_path: Path, max_train_rows: int) -> None:
    cache = write_synthetic_cache(tmp_path / "c.h5", n_per_class=40, n_classes=4)
    flipped = [3, 50, 97, 130]
    with h5py.File(cache, "r+") as handle:
        handle["labels"][flipped] = (handle["labels"][flipped] + 1) % 4
    with open_cache(cache) as (data, features):
        review = review_labels(data, features, max_train_rows=max_train_rows)
    assert set(review.order[:8]) >= set(flipped) and set(review.flagged) >= set(flipped)
    # 60 rows per head: a pool of 75 of the 160 rows trains the heads, a pass over the cache predicts every row
    assert any("random 75 of the 160" in note for note in review.notes) == (max_train_rows == 60)


def test_fewer_folds_than_asked_are_said(tmp_path: Path) -> None:
    # Before: 10 folds asked of classes of 4 images became 4 folds without a word.
    cache = write_synthetic_cache(tmp_path / "small.h5", n_per_class=4, n_classes=3)
    with open_cache(cache) as (data, features):
        review = review_labels(data, features, folds=10)
    assert review.folds == 4
    assert "4 folds instead of 10: no class has more than 4 images" in review.notes


def test_cli_audit_similar_map_and_one_line_errors(planted: Planted, tmp_path: Path) -> None:
    result = runner.invoke(app, ["audit", str(planted.cache), "--out", str(tmp_path / "audit"), "--no-sheets"])
    assert result.exit_code == 0, result.output
    assert "## Near-duplicates" in result.stdout and "| 1 | test leak |" in result.stdout
    assert not (tmp_path / "audit" / "duplicates.png").exists()
    result = runner.invoke(app, ["similar", str(planted.cache), "train/class_3/img_000.png", "-k", "2",
                                 "--out", str(tmp_path / "similar")])
    assert result.exit_code == 0, result.output
    assert "test/class_3/copy_of_000.png" in result.stdout.splitlines()[2]
    result = runner.invoke(app, ["map", str(planted.cache), "--method", "pca", "--out", str(tmp_path / "map")])
    assert result.exit_code == 0 and (tmp_path / "map" / "map-pca.png").is_file(), result.output
    for args, fragment in [
        (["audit", str(planted.cache), "--out", str(planted.root / "audit")], "pass --out elsewhere"),
        (["audit", str(tmp_path / "missing.h5")], "cache file not found"),
        (["map", str(planted.cache), "--method", "nope"], "--method nope: use one of tsne, pca, umap"),
        (["similar", str(planted.cache), "train/class_0/img_000.png", "--top", "0"], "--top 0: must be at least 1"),
        (["similar", str(planted.cache), "no/such.png"], "neither an image path"),
    ]:
        assert_one_line_error(runner.invoke(app, args), fragment)


def test_a_query_through_the_datasets_own_symlink_is_its_cached_row(tmp_path: Path) -> None:
    # Before: the path was resolved to the symlink's target, outside the dataset, and the file re-embedded
    # (the image then came back as its own nearest neighbour, at similarity 1.0).
    elsewhere = tmp_path / "photos" / "a.png"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"not read")
    data = tmp_path / "data"
    (data / "class_0").mkdir(parents=True)
    (data / "class_0" / "img_0000.png").symlink_to(elsewhere)
    cache = write_synthetic_cache(tmp_path / "c.h5", n_per_class=10, dataset_root=str(data))
    found = similar(cache, data / "class_0" / "img_0000.png", top=3, out=tmp_path / "similar")
    query = found.queries[0]
    assert query.row == 0 and all(m.row != 0 for m in query.matches)


def test_an_audit_leaves_no_contact_sheet_of_an_earlier_one(tmp_path: Path) -> None:
    # Before: an audit that drew no duplicates.png (no pairs this time) left the earlier audit's in its folder.
    cache = write_synthetic_cache(tmp_path / "c.h5", n_per_class=20, dim=8)
    out = tmp_path / "audit"
    out.mkdir()
    (out / "summary.md").write_text("# Audit of earlier.h5\n")
    for stale in ("duplicates.png", "label_issues.png"):
        (out / stale).write_bytes(b"an earlier audit's sheet")
    result = audit(cache, out=out)
    assert not (out / "duplicates.png").exists() and not (out / "label_issues.png").exists()
    assert all(path.exists() for path in result.files)


def brute_force_pairs(features: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    a, b = np.nonzero(np.triu(unit @ unit.T, k=1) >= threshold)
    return set(zip(a.tolist(), b.tolist()))


def test_no_duplicate_pair_is_dropped_for_want_of_neighbours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: each row kept its 10 nearest neighbours, so 15 copies gave at most 10 pairs each and a low
    # threshold lost pairs, silently.
    features, _ = gaussian_blobs(n_per_class=40, n_classes=3, dim=16, seed=0)
    features[40:55] = features[40]  # 15 identical rows: 105 pairs
    cache = write_synthetic_cache(tmp_path / "c.h5", features=features)
    with open_cache(cache) as (data, stored):
        copies = find_duplicates(data, stored, cache, threshold=0.999, index="exact")
        low = find_duplicates(data, stored, cache, threshold=0.8, index="exact")
        monkeypatch.setattr("tlfeat.analysis.duplicates.RESEARCH_BUDGET", 100)
        capped = find_duplicates(data, stored, cache, threshold=0.999, index="exact")
    def rows(found): return {(min(p.a, p.b), max(p.a, p.b)) for p in found.pairs}
    assert rows(copies) == {(i, j) for i in range(40, 55) for j in range(i + 1, 55)}
    assert rows(low) == brute_force_pairs(features, 0.8)
    assert len(brute_force_pairs(features, 0.8)) > 10 * len(features)  # more than 10 neighbours a row
    assert not any("neighbours" in note for note in copies.notes) and len(capped.pairs) < 105
    assert "15 images have 10 or more neighbours at or above the threshold" in capped.notes[0]


def test_a_pair_at_the_threshold_is_not_lost_to_float32_rounding(tmp_path: Path) -> None:
    # Before: the exact search's float32 similarity of a pair whose cosine reaches the threshold could fall
    # just below it, and the pair was never scored again (Scene15 at 0.6: 1 of 321,972 pairs missing).
    rng = np.random.default_rng(0)
    features = rng.normal(size=(30, 1280)).astype(np.float32)
    features[1] = features[0] + 0.9 * rng.normal(size=1280).astype(np.float32)
    x, y = features[0].astype(np.float64), features[1].astype(np.float64)
    cosine = x @ y / np.linalg.norm(x) / np.linalg.norm(y)  # 0.71290868; float32 gives 0.7129086
    cache = write_synthetic_cache(tmp_path / "c.h5", n_per_class=10, dim=1280, features=features)
    with open_cache(cache) as (data, stored):
        found = find_duplicates(data, stored, cache, threshold=cosine - 1e-9, index="exact")
    assert [(p.a, p.b) for p in found.pairs] == [(0, 1)] or [(p.b, p.a) for p in found.pairs] == [(0, 1)]
    assert found.pairs[0].similarity == pytest.approx(cosine, abs=1e-12)


def test_a_reaudit_without_label_review_removes_the_earlier_reviews_files(tmp_path: Path) -> None:
    # Before: label_issues.csv and confusion.* of an earlier audit stayed beside a summary saying "Not reviewed".
    cache = write_synthetic_cache(tmp_path / "one.h5", n_classes=1, class_names=["only"])
    out = tmp_path / "audit"
    out.mkdir()
    earlier = ("label_issues.csv", "confusion.csv", "confusion.png", "label_issues.png", "duplicates.png")
    for name in earlier + ("notes.txt",):
        (out / name).write_bytes(b"an earlier audit's")
    (out / "summary.md").write_text("# Audit of earlier.h5\n")
    result = audit(cache, out=out)
    assert "Not reviewed" in result.summary and not any((out / name).exists() for name in earlier)
    assert (out / "notes.txt").exists()  # not an audit's file: kept
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in result.files] + ["notes.txt"])


def test_an_audit_into_a_folder_of_other_files_of_its_names_is_refused(tmp_path: Path) -> None:
    # Before: `audit -o` into a fine-tune run's folder overwrote its summary.md and removed its confusion.png
    # as "an earlier audit's" file.
    cache = write_synthetic_cache(tmp_path / "one.h5", n_classes=1, class_names=["only"])
    run = tmp_path / "run"
    run.mkdir()
    mine = {"summary.md": b"# Fine-tune run\n", "confusion.png": b"the run's"}
    for name, content in mine.items():
        (run / name).write_bytes(content)
    with pytest.raises(TlfeatError, match=r"run: holds summary\.md, confusion\.png, not written by an audit"):
        audit(cache, out=run)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == mine


def test_a_faiss_index_that_cannot_be_saved_is_used_from_memory_and_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: faiss.write_index's RuntimeError (a read-only folder beside the cache) ended similar and audit
    # with a traceback.
    faiss = pytest.importorskip("faiss")

    def read_only(index: object, path: str) -> None:
        raise RuntimeError(f"Error in faiss::FileIOWriter: 'f' failed: could not open {path} for writing: "
                           "Permission denied")

    monkeypatch.setattr(faiss, "write_index", read_only)
    cache, copies = blobs_with_copies(tmp_path)
    found = similar(cache, [load(cache).paths[0]], top=3, index="faiss", out=tmp_path / "similar")
    assert found.index_built and found.queries[0].matches and not index_path(cache).exists()
    assert len(found.notes) == 1 and "not saved" in found.notes[0] and "Permission denied" in found.notes[0]
    assert str(tmp_path) in found.notes[0]
    result = audit(cache, out=tmp_path / "audit", index="faiss")
    assert {(p.a, p.b) for p in result.duplicates.pairs} >= copies
    assert "not saved" in result.summary and "Permission denied" in result.summary
    cli = runner.invoke(app, ["similar", str(cache), str(load(cache).paths[0]), "--index", "faiss",
                              "--out", str(tmp_path / "cli")])
    assert cli.exit_code == 0 and "not saved" in cli.stderr and "Traceback" not in cli.output


@pytest.mark.parametrize("method", ["tsne", "umap"])
def test_a_map_of_too_few_points_is_one_line_suggesting_pca(tmp_path: Path, method: str) -> None:
    # Before: UMAP of 2-3 points crashed in scipy; t-SNE said "this cache has 3" of a 120-image cache sampled to 3.
    cache = write_synthetic_cache(tmp_path / "c.h5")
    with pytest.raises(TlfeatError, match=r"cannot map 3 images \(it needs at least 4\); use `method='pca'`"):
        embedding_map(cache, method=method, out=tmp_path / "map", max_points=3)
    cli = runner.invoke(app, ["map", str(cache), "--method", method, "--max-points", "2", "--out", str(tmp_path / "m")])
    assert_one_line_error(cli, "cannot map 2 images", "use --method pca")


def test_a_query_the_cache_skipped_gets_the_reason(tmp_path: Path) -> None:
    # Before: "neither an image path stored in the cache nor an existing file or folder", of a file the cache
    # names as skipped, with its reason.
    features, labels = gaussian_blobs(n_per_class=5, n_classes=2, dim=8)
    cache = tmp_path / "bad.h5"
    write_cache(
        cache, CacheKey("efficientnet_lite0", "none", 32, "synthetic"), features=features, labels=labels,
        paths=[f"c{label}/img_{i}.png" for i, label in enumerate(labels)], split=["train"] * len(labels),
        file_size=[1] * len(labels), file_mtime_ns=[0] * len(labels), class_names=["c0", "c1"],
        skipped=[("c0/corrupt.jpg", "not an image Pillow can read", 10, 0)],
        extra_attrs={"dataset_root": str(tmp_path / "none")},
    )
    with pytest.raises(TlfeatError, match=r"c0/corrupt\.jpg: .*bad\.h5 holds no features for it: extraction skipped "
                                          r"it \(not an image Pillow can read\)$"):
        similar(cache, ["c0/corrupt.jpg"], out=tmp_path / "s")
    with pytest.raises(TlfeatError, match="neither an image path stored in the cache"):
        similar(cache, ["c0/never.jpg"], out=tmp_path / "s")


def test_similar_on_a_one_image_cache_says_why_nothing_matches(tmp_path: Path) -> None:
    # Before: an empty table, no word.
    single = write_synthetic_cache(tmp_path / "single.h5", n_per_class=1, n_classes=1, shares=(1.0,), splits=("train",))
    found = similar(single, ["class_0/img_0000.png"], out=tmp_path / "s")
    assert not found.queries[0].matches
    assert found.notes == ["no similar image for class_0/img_0000.png: the cache's only image is the query itself"]
    cli = runner.invoke(app, ["similar", str(single), "class_0/img_0000.png", "--out", str(tmp_path / "cli")])
    assert cli.exit_code == 0 and "the cache's only image is the query itself" in cli.stderr


def test_the_readme_lists_every_field_of_a_duplicate_pair() -> None:
    # Before: the README's DuplicatePair(...) line left out `a` and `b`, the rows of the pair.
    import dataclasses

    from tlfeat.analysis.duplicates import DuplicatePair

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    listed = re.search(r"DuplicatePair\(([^)]*)\)", readme).group(1).split(", ")
    assert listed == [f.name for f in dataclasses.fields(DuplicatePair)]
