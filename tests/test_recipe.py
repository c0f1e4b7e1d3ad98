"""`tlfeat recipe`: extract the members, fuse, choose C on val, refit on train+val, score test, save the head."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from conftest import make_dataset, run_cli, write_synthetic_cache
from tlfeat import cache
from tlfeat.apps.recipe import member_cache, run_recipe, select_and_refit
from tlfeat.apps.recipe_book import RECIPES, Member
from tlfeat.errors import TlfeatError
from tlfeat.heads.fit import fit_heads, load_features
from tlfeat.heads.rows import image_keys
from tlfeat.heads.store import load_head, read_metadata


@pytest.fixture(scope="module")
def subset(scene15: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 Scene15 classes x 8 real images, flat, so the split gives train, val and test rows."""
    root = tmp_path_factory.mktemp("recipe") / "subset"
    for class_dir in sorted((scene15 / "train").iterdir())[:3]:
        (root / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:8]:
            (root / class_dir.name / image.name).write_bytes(image.read_bytes())
    return root


def _recipe(subset: Path, name: str, cache_dir: Path) -> str:
    result = run_cli("recipe", str(subset), "--recipe", name, "--cache-dir", str(cache_dir), "-q", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_fast_recipe_end_to_end_then_reuses_its_cache(subset: Path, tmp_path: Path) -> None:
    first = _recipe(subset, "fast", tmp_path)
    member = tmp_path / "subset-efficientnet_lite0.h5"  # the file `tlfeat extract` writes by default
    assert "  efficientnet_lite0@224 " in first and f" {member}: computed 24 (" in first
    assert re.search(r"cross-validated accuracy by C \(\d folds over train\+val\): C=", first)
    assert "refitted on train+val: test " in first

    head = tmp_path / "heads" / "subset-recipe-fast" / "logreg.skops"
    estimator, meta = load_head(head)
    assert meta["params"]["C"] in RECIPES["fast"].c_grid and meta["sources"][0]["file"] == member.name
    # Refitted on train+val: it has seen every train and val row, and test is scored on the rest.
    data = cache.load(member)
    assert estimator.named_steps["standardscaler"].n_samples_seen_ == int(np.sum(data.split != "test"))
    assert meta["scores"]["test"]["n"] == int(np.sum(data.split == "test"))

    again = _recipe(subset, "fast", tmp_path)
    assert f"{member}: up to date" in again and "extraction this run 0 s" in again

    predicted = run_cli("predict", str(head), str(subset / data.paths[0]), timeout=300)
    assert predicted.returncode == 0, predicted.stderr
    assert predicted.stdout.split("\t")[1].split()[0] == data.class_names[data.labels[0]]


def test_members_share_extracts_default_cache_files(subset: Path, tmp_path: Path) -> None:
    assert member_cache(subset, None, Member("efficientnet_lite1", 240)) == Path("cache/subset-efficientnet_lite1.h5")
    assert member_cache(subset, tmp_path, Member.parse("efficientnet_lite1:300:flip")) == (
        tmp_path / "subset-efficientnet_lite1-300-flip.h5"
    )
    assert Member.parse("efficientnet_lite2:320") == Member("efficientnet_lite2", 320, "none")
    with pytest.raises(TlfeatError, match="expected BACKBONE:SIZE"):
        Member.parse("efficientnet_lite2@320")


def test_c_by_cross_validation_then_refit_on_train_and_val(tmp_path: Path) -> None:
    """Every C is cross-validated over train+val; the kept one is refitted on all those rows, scored on test."""
    from tlfeat.cache import CacheData
    from tlfeat.heads.fit import Features
    from tlfeat.heads.rows import RowIds

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 30)
    features = rng.normal(size=(60, 4)).astype(np.float32) + labels[:, None] * 8
    split = np.array((["train"] * 18 + ["val"] * 6 + ["test"] * 6) * 2)
    data = CacheData(features, labels, np.array([f"{i}.png" for i in range(60)]), split, ["a", "b"], {})
    ids = RowIds.of(list(data.paths), [100] * 60, features)
    fitted = select_and_refit(Features(data, [], "synthetic", ids), [0.1, 1.0])
    assert [t["C"] for t in fitted.trials] == [0.1, 1.0] and fitted.c == 0.1  # tie: the earlier C
    assert fitted.folds == 5 and [t["cv_accuracy"] for t in fitted.trials] == [1.0, 1.0]
    assert fitted.metrics["cv"]["n"] == 48 and fitted.metrics["test"]["accuracy"] == 1.0
    assert fitted.estimator.named_steps["standardscaler"].n_samples_seen_ == 48

    one = select_and_refit(Features(data, [], "synthetic", ids), [0.3])  # nothing to choose: no cross-validation
    assert one.folds == 0 and not one.trials and set(one.metrics) == {"test"} and one.c == 0.3


def test_test_rows_that_copy_fitted_rows_are_left_out_of_the_recipe_score() -> None:
    # Before: the recipe scored every test row, copies of its train+val rows included (Scene15's fast recipe:
    # n=2985, where `evaluate` of the same head scores 2974 and says why), so its test score could be inflated.
    from tlfeat.cache import CacheData
    from tlfeat.heads.fit import Features
    from tlfeat.heads.rows import RowIds

    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 30)
    features = rng.normal(size=(60, 4)).astype(np.float32) + labels[:, None] * 2
    split = np.array((["train"] * 20 + ["test"] * 10) * 2)
    features[[20, 21, 50]] = features[[0, 1, 30]]  # 3 test rows: the features of train rows, under other names
    data = CacheData(features, labels, np.array([f"{i}.png" for i in range(60)]), split, ["a", "b"], {})
    fitted = select_and_refit(Features(data, [], "synthetic", RowIds.of(list(data.paths), [100] * 60, features)), [1.0])
    assert fitted.metrics["test"]["n"] == 17
    assert fitted.notes[0] == "test: 3 rows left out of the score, copies of rows this head was fitted on"
    # Its outcome on each test image scored, for compare's paired test: the 17 scored, none of the copies.
    scored = (split == "test") & ~np.isin(np.arange(60), [20, 21, 50])
    assert np.array_equal(fitted.test.image, image_keys([f"{i}.png" for i in np.flatnonzero(scored)], [100] * 17))
    assert np.array_equal(fitted.test.predicted, fitted.estimator.predict(features[scored]))
    assert np.array_equal(fitted.test.label, labels[scored])



def test_cross_validation_holds_an_images_copies_out_together() -> None:
    # Before: the folds were drawn over rows, so an image and its copy could sit on both sides of a fold: each
    # held-out copy was predicted by a head fitted on its twin. Here every train image has a copy and the labels
    # are random: the cross-validated accuracy was 0.9 (memorised twins), where nothing can be learnt.
    from tlfeat.cache import CacheData
    from tlfeat.heads.fit import Features
    from tlfeat.heads.rows import RowIds

    rng = np.random.default_rng(0)
    unique = rng.normal(size=(60, 100)).astype(np.float32)
    features = np.concatenate([unique, unique, rng.normal(size=(12, 100)).astype(np.float32)])
    labels = np.concatenate([np.tile(np.arange(3), 20)] * 2 + [np.arange(12) % 3])
    split = np.array(["train"] * 120 + ["test"] * 12)
    data = CacheData(features, labels, np.array([f"{i}.png" for i in range(132)]), split, ["a", "b", "c"], {})
    fitted = select_and_refit(Features(data, [], "synthetic", RowIds.of(list(data.paths), [100] * 132, features)),
                              [10.0, 0.01])
    assert fitted.folds == 5 and max(t["cv_accuracy"] for t in fitted.trials) < 0.6, fitted.trials

def test_unknown_recipe_is_a_one_line_error(tmp_path: Path) -> None:
    result = run_cli("recipe", str(tmp_path), "--recipe", "huge", timeout=120)
    assert result.returncode == 1 and result.stderr.strip() == "error: --recipe huge: unknown; choose one of fast, best"


@pytest.mark.slow
def test_best_recipe_end_to_end(subset: Path, tmp_path: Path) -> None:
    out = _recipe(subset, "best", tmp_path)
    for member in RECIPES["best"].members:
        assert f"{member.label} " in out
    meta = read_metadata(tmp_path / "heads" / "subset-recipe-best" / "logreg.skops")
    assert [(s["backbone"], s["input_size"], s["tta"]) for s in meta["sources"]] == [
        (m.backbone, m.image_size, m.tta) for m in RECIPES["best"].members
    ]
    assert meta["feature_dim"] == 1280 * len(RECIPES["best"].members)
    assert load_features([Path(s["path"]) for s in meta["sources"]]).data.features.shape[1] == meta["feature_dim"]


def _synthetic_extract(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """`extract` as the recipe calls it, writing a small synthetic cache (blobs of this seed) instead."""
    import tlfeat.extraction.run as run_module

    def extract(data: Path, out: Path, **kwargs: object) -> object:
        write_synthetic_cache(out, n_per_class=20, seed=seed, dataset_root=str(Path(data).resolve()))
        return type("Summary", (), dict(n_computed=60, n_reused=0, seconds=0.0, images_per_s=0.0))()

    monkeypatch.setattr(run_module, "extract", extract)


def test_recipe_heads_go_to_a_folder_of_their_dataset_and_never_replace_other_datas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the default folder was <cache dir>/heads/recipe-<name> for every dataset, and a recipe on
    # another dataset silently replaced the head there (fit-head refuses a folder of other data's heads).
    _synthetic_extract(monkeypatch, seed=1)
    result = run_recipe(tmp_path / "alpha", recipe="fast", cache_dir=tmp_path / "c", progress=False)
    assert result.out == tmp_path / "c" / "heads" / "alpha-recipe-fast"
    other = tmp_path / "c" / "heads" / "beta-recipe-fast"
    assert run_recipe(tmp_path / "beta", recipe="fast", cache_dir=tmp_path / "c", progress=False).out == other
    assert run_recipe(tmp_path / "alpha", recipe="fast", cache_dir=tmp_path / "c", progress=False).out == result.out

    folder = tmp_path / "heads-of-other-data"
    fit_heads([write_synthetic_cache(tmp_path / "other.h5", n_per_class=30, seed=5)], head="logreg", out=folder)
    before = (folder / "logreg.skops").read_bytes()
    with pytest.raises(TlfeatError, match="holds heads fitted on other data"):
        run_recipe(tmp_path / "alpha", recipe="fast", cache_dir=tmp_path / "c", out=folder, progress=False)
    assert (folder / "logreg.skops").read_bytes() == before


def test_recipe_never_writes_inside_the_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _synthetic_extract(monkeypatch, seed=1)
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(TlfeatError, match=r"data/heads: inside the dataset folder .* pass `out` elsewhere"):
        run_recipe(data, recipe="fast", cache_dir=tmp_path / "c", out=data / "heads", progress=False)
    with pytest.raises(TlfeatError, match=r"inside the dataset folder .* pass `cache_dir` elsewhere"):
        run_recipe(data, recipe="fast", cache_dir=data / "c", out=tmp_path / "heads", progress=False)
    assert list(data.iterdir()) == []


def test_recipe_passes_overwrite_to_its_members_extraction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: a member cache split by another seed was refused with "pass --overwrite", an option recipe lacked.
    import tlfeat.extraction.run as run_module
    from typer.testing import CliRunner

    from tlfeat.cli import app

    given = []

    def extract(data: Path, out: Path, **kwargs: object) -> object:
        given.append(kwargs["overwrite"])
        write_synthetic_cache(out, n_per_class=20, dataset_root=str(Path(data).resolve()))
        return type("Summary", (), dict(n_computed=60, n_reused=0, seconds=0.0, images_per_s=0.0))()

    monkeypatch.setattr(run_module, "extract", extract)
    command = ["recipe", str(tmp_path / "alpha"), "--recipe", "fast", "--cache-dir", str(tmp_path / "c"), "-q"]
    result = CliRunner().invoke(app, [*command, "--overwrite"])
    assert result.exit_code == 0, result.output
    run_recipe(tmp_path / "alpha", recipe="fast", cache_dir=tmp_path / "c", progress=False)
    assert given == [True, False]
    again = CliRunner().invoke(app, command)  # before: the head was replaced without a word, as fit-head says it
    assert again.exit_code == 0 and "replaced logreg.skops (was C=" in again.output, again.output
    assert "(cross-validated)" in again.output and "searched on val" not in again.output  # before: "on val"


@pytest.mark.slow
def test_a_member_cache_it_may_not_change_is_refused_with_the_recipes_own_options(tmp_path: Path) -> None:
    # Before: extract's refusal advised "--out for a new file", and a recipe's --out is its head folder:
    # `recipe DATA --out elsewhere` failed the same way again. Its member caches move with --cache-dir.
    data = make_dataset(tmp_path / "data", n_classes=2, per_class=3)
    member = member_cache(data, tmp_path / "caches", RECIPES["fast"].members[0])
    write_synthetic_cache(member)  # other settings: refused, as extract refuses it
    with pytest.raises(TlfeatError, match=r"pass `overwrite` to replace it or `cache_dir` for new files\)?$"):
        run_recipe(data, "fast", cache_dir=tmp_path / "caches", progress=False)
    result = run_cli("recipe", str(data), "--recipe", "fast", "--cache-dir", str(tmp_path / "caches"), timeout=300)
    assert result.returncode == 1 and "or --cache-dir for new files" in result.stderr
    assert "--out" not in result.stderr


def test_too_few_images_to_cross_validate_is_said_and_the_head_records_the_folds_used() -> None:
    # Before: a class with one train+val image left C at the grid's first value with nothing said (no
    # cross-validation line, no note), and every recipe head recorded "C by 5-fold cross-validation",
    # also when 3 folds (a class of 3 images) or none were used.
    from tlfeat.apps.recipe import _description
    from tlfeat.cache import CacheData
    from tlfeat.heads.fit import Features
    from tlfeat.heads.rows import RowIds

    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1], 6)
    features = rng.normal(size=(12, 4)).astype(np.float32) + labels[:, None] * 8
    split = np.array(["train"] + ["test"] * 5 + ["train"] * 3 + ["val"] + ["test"] * 2)
    data = CacheData(features, labels, np.array([f"{i}.png" for i in range(12)]), split, ["a", "b"], {})
    fitted = select_and_refit(Features(data, [], "synthetic", RowIds.of(list(data.paths), [100] * 12, features)),
                              RECIPES["fast"].c_grid)
    assert fitted.folds == 0 and fitted.c == RECIPES["fast"].c_grid[0]
    assert any("not cross-validated" in note and "1 train+val image" in note for note in fitted.notes)
    assert "not cross-validated" in _description(RECIPES["fast"], fitted)
    fitted.folds = 3
    assert "C by 3-fold cross-validation over train+val" in _description(RECIPES["fast"], fitted)
