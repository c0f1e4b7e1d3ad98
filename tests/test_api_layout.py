"""The package as a library: the public API, its lazy imports, the layout's import rules, the entry points."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, child_env, make_dataset

PUBLIC = ["Interrupted", "TlfeatError", "audit", "compare", "demo", "doctor", "embedding_map", "evaluate", "export", "extract",
          "finetune", "fit_heads", "list_backbones", "list_heads", "load", "load_head", "predict", "recipe", "similar",
          # the types they return
          "AuditResult", "CacheData", "CompareResult", "DemoResult", "Evaluation", "ExportSummary", "ExtractSummary",
          "FinetuneSummary", "FitSummary", "HeadResult", "MapResult", "PredictResult", "Prediction", "RecipeResult",
          "SimilarResult"]

# The data flow, lowest first: a module may import its own stage and lower ones, never a higher one.
STAGES = [
    ("tlfeat.errors", "tlfeat.fileio", "tlfeat.interrupts", "tlfeat.lazy", "tlfeat.progress", "tlfeat.quiet_import",
     "tlfeat.seeding"),
    ("tlfeat.data",),
    ("tlfeat.backbones",),
    ("tlfeat.runtime",),
    ("tlfeat.cache", "tlfeat.cache_checks", "tlfeat.cache_writer"),
    ("tlfeat.extraction",),
    ("tlfeat.reports",),
    ("tlfeat.heads", "tlfeat.finetuning"),
    ("tlfeat.apps", "tlfeat.analysis"),
    ("tlfeat.cli",),
]


def _stage(module: str) -> int:
    for level, prefixes in enumerate(STAGES):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    raise AssertionError(f"{module}: not placed in the layout's stages")


def _tlfeat_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tlfeat"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tlfeat"))
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_public_api_is_listed_documented_and_typed() -> None:
    import tlfeat

    assert sorted(tlfeat.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        value = getattr(tlfeat, name)
        assert value.__doc__ and not value.__doc__.startswith(f"{name}("), name  # not dataclass's generated one
        if callable(value) and not isinstance(value, type):  # functions; the error classes have no return
            assert value.__annotations__.get("return"), f"tlfeat.{name} has no return type"
    with pytest.raises(AttributeError):
        tlfeat.no_such_thing  # noqa: B018


def _heavy_modules_after(script: str, heavy: tuple[str, ...]) -> list[str]:
    """Which of `heavy` a fresh interpreter has imported once it has run `script`."""
    script += f"\nimport sys\nprint([m for m in {heavy!r} if m in sys.modules])\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=child_env(),
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return ast.literal_eval(result.stdout.strip().splitlines()[-1])


def test_importing_tlfeat_and_loading_a_cache_never_imports_keras(tmp_path: Path) -> None:
    from conftest import write_synthetic_cache

    cache = write_synthetic_cache(tmp_path / "c.h5", n_per_class=4, n_classes=2, dim=3)
    script = (
        "import tlfeat\n"
        f"data = tlfeat.load({str(cache)!r}, split='train')\n"
        "names = [b.name for b in tlfeat.list_backbones()] + [h.name for h in tlfeat.list_heads()]\n"
        "assert len(data) == 4 and len(names) > 40, (len(data), names)\n"
    )
    assert _heavy_modules_after(script, ("keras", "tensorflow", "jax", "torch")) == []


def test_the_cli_loads_no_model_library_before_a_command_runs() -> None:
    # Before: building the CLI (for `tlfeat --help`, `backbones`, or any command) imported scikit-learn
    # through the help texts' constants (the heads registry, the analysis package, the recipe module):
    # 2.9 s of a 3 s `--help` on the 2-core machine. Each command now imports what it runs.
    heavy = ("sklearn", "scipy", "keras", "tensorflow", "jax", "torch")
    assert _heavy_modules_after("import tlfeat.cli", heavy) == []


def test_lower_stages_never_import_higher_ones() -> None:
    violations = []
    for path in sorted((REPO / "tlfeat").rglob("*.py")):
        module = _module_name(path)
        if module in ("tlfeat", "tlfeat.__main__"):  # the API and entry point sit above every stage
            continue
        for imported in _tlfeat_imports(path):
            if imported != "tlfeat" and _stage(imported) > _stage(module):
                violations.append(f"{module} imports {imported}")
    assert not violations, violations


def test_no_module_is_over_about_400_lines() -> None:
    sizes = {p.relative_to(REPO).as_posix(): len(p.read_text().splitlines()) for p in (REPO / "tlfeat").rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 420} == {}


@pytest.mark.parametrize("command", [
    [sys.executable, "cli.py", "--help"],
    [sys.executable, "-m", "tlfeat", "--help"],
])
def test_every_entry_point_runs_the_same_app(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    for name in ("extract", "fit-head", "finetune", "predict", "evaluate", "compare", "demo", "backbones", "audit",
                 "similar", "map", "export", "recipe", "doctor"):
        assert name in result.stdout


def test_installed_package_has_no_top_level_cli_module() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert 'py-modules = ["cli"]' not in text and 'tlfeat = "tlfeat.cli:main"' in text


def test_declared_scikit_learn_has_what_tlfeat_imports() -> None:
    # Before: "scikit-learn>=1.4", but under 1.4 and 1.5 (checked with 1.5.2) `fit_heads` raised ImportError for
    # every head: the Keras head imports sklearn.utils.validation.validate_data, public since 1.6.
    import re

    floor = re.search(r'"scikit-learn>=([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert tuple(int(part) for part in floor.split(".")) >= (1, 6)


def test_library_errors_name_parameters_and_the_cli_names_options(tmp_path: Path) -> None:
    import tlfeat
    from tlfeat.errors import cli_terms

    data = make_dataset(tmp_path / "d", n_classes=2, per_class=3)
    with pytest.raises(tlfeat.TlfeatError, match=r"`batch_size=0`: must be at least 1"):
        tlfeat.extract(data, out=tmp_path / "c.h5", batch_size=0)
    assert cli_terms("`batch_size=0`: must; pass `overwrite`; `ratios` too", {"ratios": "--split"}) == (
        "--batch-size 0: must; pass --overwrite; --split too"
    )


@pytest.mark.slow
def test_the_notebook_example_runs_on_a_small_dataset(tmp_path: Path) -> None:
    # 12 a class: with 8, seed 0's per-image split draws no train image for class_1 (fit-head refuses that).
    data = make_dataset(tmp_path / "shapes", n_classes=3, per_class=12)
    before = sorted(data.rglob("*"))
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "notebook_quickstart.py"), str(data), "--out", str(tmp_path / "out"),
         "--image-size", "64"],
        capture_output=True, text=True, env=child_env(), timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "extracted 36 images x 1280 dims" in result.stdout
    assert "predicted" in result.stdout and "logreg" in result.stdout
    assert sorted(data.rglob("*")) == before  # nothing written inside the dataset


def test_one_path_where_a_list_is_expected_means_that_file(tmp_path: Path) -> None:
    # Before: a str or Path was iterated letter by letter: fit_heads("c.h5") said "the same cache file is given
    # twice", predict(model, "photo.jpg") "p, h, o, t, o, j, p, g: not found", evaluate(model, Path(...)) a
    # TypeError; an empty list gave messages naming nothing (": no image files to predict").
    import tlfeat
    from conftest import write_synthetic_cache

    cache = write_synthetic_cache(tmp_path / "c.h5", n_per_class=12, n_classes=2, dim=4)
    fitted = tlfeat.fit_heads(str(cache), head="logreg", out=tmp_path / "heads")
    model = tmp_path / "heads" / "logreg.skops"
    assert [r.head for r in fitted.results] == ["logreg"]
    assert tlfeat.evaluate(model, cache).metrics["test"]["accuracy"] == fitted.results[0].scores["test"]["accuracy"]
    assert [row.name for row in tlfeat.compare(tmp_path / "heads").rows] == ["heads/logreg"]
    assert len(tlfeat.similar(cache, "class_0/img_0000.png", top=3).queries) == 1
    with pytest.raises(tlfeat.TlfeatError, match=r"^photo\.jpg: not found$"):
        tlfeat.predict(model, "photo.jpg")
    for call, name in [(lambda: tlfeat.predict(model, []), "inputs"), (lambda: tlfeat.compare([]), "inputs"),
                       (lambda: tlfeat.fit_heads([]), "caches"), (lambda: tlfeat.similar(cache, []), "queries"),
                       (lambda: tlfeat.evaluate(model, 3), "caches")]:
        with pytest.raises(tlfeat.TlfeatError, match=rf"^`{name}=(\[\]|3)`: "):
            call()


def test_evaluate_writes_its_json_report_from_python_too(tmp_path: Path) -> None:
    # Before: only `tlfeat evaluate --json` wrote the report; tlfeat.evaluate had no way to.
    import json

    import tlfeat
    from conftest import write_synthetic_cache

    cache = write_synthetic_cache(tmp_path / "c.h5", n_per_class=12, n_classes=2, dim=4)
    tlfeat.fit_heads(cache, head="logreg", out=tmp_path / "heads")
    model = tmp_path / "heads" / "logreg.skops"
    with pytest.raises(tlfeat.TlfeatError, match=r"c\.h5: exists and is not a \.json file"):
        tlfeat.evaluate(model, cache, json=cache)
    evaluation = tlfeat.evaluate(model, cache, json=tmp_path / "e.json")
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["splits"]["test"]["accuracy"] == evaluation.metrics["test"]["accuracy"]
    assert report["classes"] == ["class_0", "class_1"] and report["caches"] == [str(cache)]


def test_predict_and_similar_check_batch_size_before_any_work(tmp_path: Path) -> None:
    # Before: batch_size=0 was taken for the default, -5 ended in "ValueError: cannot mmap an empty file"
    # (the CLI: a 123-line traceback).
    import tlfeat
    from conftest import write_synthetic_cache

    cache = write_synthetic_cache(tmp_path / "c.h5", n_per_class=12, n_classes=2, dim=4)
    for size in (0, -5):
        with pytest.raises(tlfeat.TlfeatError, match=rf"^`batch_size={size}`: must be at least 1$"):
            tlfeat.predict(tmp_path / "model.skops", tmp_path / "photo.jpg", batch_size=size)
        with pytest.raises(tlfeat.TlfeatError, match=rf"^`batch_size={size}`: must be at least 1$"):
            tlfeat.similar(cache, tmp_path / "photo.jpg", batch_size=size)


def test_results_print_briefly_in_a_notebook(tmp_path: Path) -> None:
    # Before, on 15 classes (the helper's Scene15 figures): an Evaluation's repr ran to 16,050 characters, an
    # AuditResult's to 22,751 and a PredictResult's to 9,023 (the head's metadata, every row and pair).
    import tlfeat
    from conftest import write_synthetic_cache
    from tlfeat.apps.predict import PredictResult

    cache = write_synthetic_cache(tmp_path / "c.h5", n_per_class=20, n_classes=15, dim=8)
    fitted = tlfeat.fit_heads(cache, head=["logreg", "knn"], out=tmp_path / "heads")
    # Before: 2,175 characters (each cache's record, every head's scores and files, the table with its \n).
    assert repr(fitted).startswith("FitSummary(out=") and len(repr(fitted)) < 600, repr(fitted)
    compared = tlfeat.compare(tmp_path / "heads")  # before: 2,116 characters
    assert repr(compared).startswith("CompareResult(2 rows") and len(repr(compared)) < 600, repr(compared)
    model = tmp_path / "heads" / "logreg.skops"
    evaluation = tlfeat.evaluate(model, cache)
    assert "'test': " in repr(evaluation) and len(repr(evaluation)) < 600, repr(evaluation)
    data = tlfeat.load(cache)  # before: 4,800 characters of arrays; `==` raised numpy's ambiguous truth value
    assert repr(data).startswith("CacheData(300 rows x 8 features, 15 classes; train") and data == data
    with pytest.raises(tlfeat.TlfeatError, match="unknown split 'validation'"):  # before: 0 rows, silently
        data.select("validation")
    assert "lambda" not in repr(tlfeat.list_backbones()[0]) + repr(tlfeat.list_heads()[0])
    from tlfeat.finetuning.train import FinetuneSummary
    scored = FinetuneSummary(tmp_path, {"method": "fine-tuned, whole base", "scores": {"test": {"accuracy": 0.92}}})
    assert repr(scored) == f"FinetuneSummary(out={str(tmp_path)!r}, fine-tuned, whole base, test accuracy 0.9200, 0 images skipped)"
    audit = tlfeat.audit(cache, out=tmp_path / "audit")
    assert "label issues flagged" in repr(audit) and len(repr(audit)) < 600, repr(audit)
    found = tlfeat.embedding_map(cache, method="pca", out=tmp_path / "map")
    assert len(repr(found)) < 600 and len(repr(found.map)) < 300, repr(found.map)
    queries = list(data.paths[:10])
    near = tlfeat.similar(cache, queries, progress=False, out=tmp_path / "similar")  # before: 12,761 characters
    assert repr(near).startswith("SimilarResult(") and len(repr(near)) < 600, repr(near)
    with pytest.raises(tlfeat.TlfeatError, match="^`max_points=0`: must be at least 2$"):  # sklearn's error before
        tlfeat.embedding_map(cache, method="pca", max_points=0)
    assert len(repr(PredictResult(model, evaluation.meta))) < 600


def test_each_function_has_its_commands_defaults() -> None:
    # Before: fit_heads fitted every head by default, `tlfeat fit-head` logistic regression alone.
    import inspect

    import typer.main

    import tlfeat
    from tlfeat.cli import app

    commands = typer.main.get_command(app).commands
    pairs = {"extract": tlfeat.extract, "fit-head": tlfeat.fit_heads, "predict": tlfeat.predict,
             "evaluate": tlfeat.evaluate, "similar": tlfeat.similar, "audit": tlfeat.audit, "map": tlfeat.embedding_map,
             "export": tlfeat.export, "recipe": tlfeat.recipe, "finetune": tlfeat.finetune, "compare": tlfeat.compare}
    differ, shared = [], 0
    for command, function in pairs.items():
        signature = inspect.signature(function).parameters
        for option in commands[command].params:
            python = signature.get(option.name)
            cli_default = option.default
            if option.name == "quiet" and "progress" in signature:  # Before: predict and similar were quiet
                python, cli_default = signature["progress"], not option.default
            if python is not None and python.default is not inspect.Parameter.empty:
                shared += 1
                if python.default != cli_default and [python.default] != cli_default:  # a repeatable --head: [x] is x
                    differ.append(f"{command} {option.name}: {cli_default!r} vs {python.default!r}")
    assert shared > 40 and not differ, differ


def test_numpy_integers_are_taken_and_wrong_types_refused_before_any_work(tmp_path: Path) -> None:
    # Before: np.int64 seeds and sizes crashed after the work (a JSON record could not hold them, the head or
    # the first batch lost); floats and strings failed deep in numpy, sklearn or Keras.
    import numpy as np

    import tlfeat
    from conftest import write_synthetic_cache

    cache = write_synthetic_cache(tmp_path / "c.h5")
    fitted = tlfeat.fit_heads(cache, head=["logreg", "knn"], seed=np.int64(1), out=tmp_path / "heads")
    assert [r.head for r in fitted.results] == ["logreg", "knn"]
    estimator, meta = tlfeat.load_head(str(tmp_path / "heads" / "logreg.skops"))  # public: predict on features
    test = tlfeat.load(cache, split="test")
    assert (estimator.predict(test.features) == test.labels).mean() > 0.9 and meta["head"] == "logreg"
    data = make_dataset(tmp_path / "data")
    summary = tlfeat.extract(data, out=tmp_path / "x.h5", weights="none", image_size=np.int64(32), seed=np.int64(0),
                             progress=False)
    assert summary.n_computed > 0
    refused = [
        (lambda: tlfeat.fit_heads(cache, seed="1", out=tmp_path / "h2"), "`seed='1'`: must be an integer"),
        (lambda: tlfeat.fit_heads(cache, head=[1], out=tmp_path / "h2"), "`head=[1]`: a head name or a list"),
        (lambda: tlfeat.extract(data, weights="none", image_size=224.5), "`image_size=224.5`: must be an integer"),
        (lambda: tlfeat.extract(data, weights="none", batch_size="32"), "`batch_size='32'`: must be an integer"),
        (lambda: tlfeat.predict(tmp_path / "heads" / "logreg.skops", data, top=1.5), "`top=1.5`: must be an integer"),
        (lambda: tlfeat.audit(cache, dup_threshold="0.95"), "`dup_threshold='0.95'`: must be a finite number"),
        (lambda: tlfeat.audit(cache, dup_threshold=float("nan")), "`dup_threshold=nan`: must be a finite number"),
        (lambda: tlfeat.audit(cache, folds=2.5), "`folds=2.5`: must be an integer"),
        (lambda: tlfeat.audit(cache, max_train_rows=0), "`max_train_rows=0`: must be at least 1"),
        (lambda: tlfeat.audit(cache, max_train_rows=2), "leaves a fold's head one class to learn"),
        (lambda: tlfeat.finetune(data, epochs1=1.5), "`epochs1=1.5`: must be an integer"),
    ]
    for call, message in refused:
        with pytest.raises(tlfeat.TlfeatError) as error:
            call()
        assert message in str(error.value)
    assert not (tmp_path / "h2").exists()


def test_a_path_parameter_of_another_type_is_refused_by_name(tmp_path: Path) -> None:
    # Before: a list, a number or a result object where one path belongs (`tlfeat.load([a, b])`,
    # `tlfeat.audit(summary)`) raised Python's "TypeError: expected str, bytes or os.PathLike object, not list"
    # from pathlib, naming no parameter; a list item of another type (`fit_heads([3])`) the same.
    import tlfeat
    from conftest import write_synthetic_cache

    cache = write_synthetic_cache(tmp_path / "c.h5")
    fitted = tlfeat.fit_heads(cache, head="logreg", out=tmp_path / "heads")
    model = fitted.out / "logreg.skops"
    data = make_dataset(tmp_path / "data", n_classes=2, per_class=3)
    calls = {
        "data": [lambda v: tlfeat.extract(v), lambda v: tlfeat.finetune(v), lambda v: tlfeat.recipe(v)],
        "out": [lambda v: tlfeat.extract(data, out=v, weights="none"), lambda v: tlfeat.fit_heads(cache, out=v),
                lambda v: tlfeat.finetune(data, out=v, weights="none"), lambda v: tlfeat.recipe(data, out=v),
                lambda v: tlfeat.export(cache, out=v), lambda v: tlfeat.audit(cache, out=v),
                lambda v: tlfeat.similar(cache, "class_0/img_0000.png", out=v),
                lambda v: tlfeat.embedding_map(cache, out=v), lambda v: tlfeat.demo(v)],
        "path": [lambda v: tlfeat.load(v)],
        "model_path": [lambda v: tlfeat.load_head(v)],
        "model": [lambda v: tlfeat.predict(v, data), lambda v: tlfeat.evaluate(v, cache)],
        "cache": [lambda v: tlfeat.export(v), lambda v: tlfeat.audit(v), lambda v: tlfeat.similar(v, "x.png"),
                  lambda v: tlfeat.embedding_map(v)],
        "cache_dir": [lambda v: tlfeat.recipe(data, cache_dir=v)],
        "csv": [lambda v: tlfeat.predict(model, data, csv=v), lambda v: tlfeat.compare(model, csv=v)],
        "png": [lambda v: tlfeat.compare(model, png=v)],
        "json": [lambda v: tlfeat.evaluate(model, cache, json=v)],
        "head": [lambda v: tlfeat.embedding_map(cache, head=v)],
        "caches": [lambda v: tlfeat.fit_heads([v]), lambda v: tlfeat.evaluate(model, [v])],
        "inputs": [lambda v: tlfeat.predict(model, [v]), lambda v: tlfeat.compare([v])],
        "queries": [lambda v: tlfeat.similar(cache, [v])],
    }
    for name, functions in calls.items():
        for call in functions:
            for value in (3, [str(cache)]) if name not in ("caches", "inputs", "queries") else (3, b"c.h5"):
                with pytest.raises(tlfeat.TlfeatError, match=rf"^`{name}=.*`: expected a path"):
                    call(value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5", "data", "heads"]  # no work was done
