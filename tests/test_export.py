"""Export of a cache to Parquet and to .npy + CSV: round trips equal tlfeat.cache.load, memory bounded by a chunk."""

from __future__ import annotations

import csv
import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from conftest import plant_features, run_cli, write_synthetic_cache
from tlfeat import cache, cache_writer
from tlfeat.apps.export import export
from tlfeat.errors import TlfeatError

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:
    pa = pq = None
needs_pyarrow = pytest.mark.skipif(pa is None, reason="pyarrow not installed (pip install -e '.[export]')")


def synthetic_cache(path: Path, n: int, dim: int, dtype: str = "float32", seed: int = 0) -> Path:
    """A cache of n random rows over 3 classes, with awkward paths (comma, quote, non-ASCII)."""
    rng = np.random.default_rng(seed)
    classes = ["a,b", "caf\u00e9", "z"]
    labels = rng.integers(0, len(classes), n).astype(np.int32)
    features = rng.standard_normal((n, dim)).astype(np.float32)
    paths = [f'{classes[c]}/img "{i}",x.png' for i, c in enumerate(labels)]
    split = [("train", "val", "test")[i % 3] for i in range(n)]
    key = cache.CacheKey("vgg16", "none", 32, "caffe:BGR-mean", dtype=dtype)
    zeros = [0] * n
    cache_writer.write_cache(path, key, features, labels, paths, split, zeros, zeros, classes, [], {"seed": 0})
    return path


def read_parquet(files: list[Path]) -> dict:
    table = pa.concat_tables([pq.read_table(f) for f in files])
    dim = table.schema.field("features").type.list_size
    return {
        "features": table.column("features").combine_chunks().flatten().to_numpy().reshape(-1, dim),
        "labels": table.column("label").to_numpy(),
        "paths": table.column("path").to_pylist(),
        "split": table.column("split").to_pylist(),
        "class_name": table.column("class_name").to_pylist(),
        "meta": json.loads(table.schema.metadata[b"tlfeat"]),
        "schema": table.schema,
    }


@needs_pyarrow
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_parquet_round_trip_equals_load(tmp_path: Path, dtype: str) -> None:
    source = synthetic_cache(tmp_path / "c.h5", n=1000, dim=24, dtype=dtype)
    summary = export(source, "parquet", tmp_path / "pq", chunk_rows=64, rows_per_file=300)
    assert [f.name for f in summary.files] == [f"part-{i:05d}.parquet" for i in range(4)]
    assert [pq.ParquetFile(f).metadata.num_rows for f in summary.files] == [300, 300, 300, 100]
    assert pq.ParquetFile(summary.files[0]).metadata.num_row_groups == 5  # 64-row chunks, cut at the file's end
    got, expected = read_parquet(summary.files), cache.load(source)
    kind = got["schema"].field("features").type
    assert pa.types.is_fixed_size_list(kind) and kind.list_size == 24 and kind.value_type == pa.float32()
    assert got["features"].dtype == np.float32
    np.testing.assert_array_equal(got["features"], expected.features)
    np.testing.assert_array_equal(got["labels"], expected.labels)
    assert got["paths"] == list(expected.paths) and got["split"] == list(expected.split)
    assert got["class_name"] == [expected.class_names[i] for i in expected.labels]
    assert got["meta"]["class_names"] == expected.class_names and got["meta"]["attrs"]["dtype"] == dtype


@needs_pyarrow
def test_parquet_directory_reads_as_one_dataset(tmp_path: Path) -> None:
    """What pandas / Ray Data / DuckDB do: point at the folder, get every row in order."""
    source = synthetic_cache(tmp_path / "c.h5", n=500, dim=8)
    export(source, "parquet", tmp_path / "pq", rows_per_file=128)
    table = pq.read_table(tmp_path / "pq")
    assert table.column("path").to_pylist() == list(cache.load(source).paths)


def test_an_export_stopped_midway_leaves_no_readable_part_and_is_cleaned_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: each part was renamed as it finished: a killed export read back as a smaller, whole-looking table.
    from tlfeat.apps import export as export_module

    source = synthetic_cache(tmp_path / "c.h5", n=500, dim=8)
    original, written = export_module._parquet_table, [0]

    def dies_in_the_third_part(*args: object) -> object:
        written[0] += 1
        if written[0] == 3:
            raise KeyboardInterrupt  # as a kill would stop it; the hidden files are then left behind
        return original(*args)

    monkeypatch.setattr(export_module, "_parquet_table", dies_in_the_third_part)
    monkeypatch.setattr(export_module.Path, "unlink", lambda self, missing_ok=False: None)  # a kill cleans nothing
    with pytest.raises(KeyboardInterrupt):
        export(source, "parquet", tmp_path / "pq", rows_per_file=128, chunk_rows=128)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "pq").iterdir() if not p.name.startswith(".")] == []
    assert pq.read_table(tmp_path / "pq").num_rows == 0  # readers skip the hidden parts
    export(source, "parquet", tmp_path / "pq", rows_per_file=128)  # no earlier export to refuse
    assert sorted(p.name for p in (tmp_path / "pq").iterdir()) == [f"part-{i:05d}.parquet" for i in range(4)]


def test_npy_round_trip_equals_load(tmp_path: Path) -> None:
    source = synthetic_cache(tmp_path / "c.h5", n=777, dim=16, dtype="float16")
    summary = export(source, "npy", tmp_path / "np", chunk_rows=50)
    expected = cache.load(source)
    features = np.load(tmp_path / "np" / "features.npy")
    assert features.dtype == np.float32
    np.testing.assert_array_equal(features, expected.features)
    with open(tmp_path / "np" / "rows.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["path"] for r in rows] == list(expected.paths)
    assert [int(r["label"]) for r in rows] == list(expected.labels)
    assert [r["split"] for r in rows] == list(expected.split)
    assert [r["class_name"] for r in rows] == [expected.class_names[i] for i in expected.labels]
    meta = json.loads((tmp_path / "np" / "meta.json").read_text())
    assert meta["class_names"] == expected.class_names and meta["n_rows"] == 777
    assert [f.name for f in summary.files] == ["features.npy", "rows.csv", "meta.json"]


@needs_pyarrow
def test_empty_cache_exports_its_schema(tmp_path: Path) -> None:
    source = synthetic_cache(tmp_path / "c.h5", n=0, dim=8)
    summary = export(source, "parquet", tmp_path / "pq")
    table = pq.read_table(summary.files[0])
    assert table.num_rows == 0 and table.schema.field("features").type.list_size == 8
    export(source, "npy", tmp_path / "np")
    assert np.load(tmp_path / "np" / "features.npy").shape == (0, 8)


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_export_memory_is_bounded_by_a_chunk(tmp_path: Path, fmt: str) -> None:
    if fmt == "parquet" and pa is None:
        pytest.skip("pyarrow not installed (pip install -e '.[export]')")
    n, dim = 40000, 512  # 78 MB of features, read 1024 rows (2 MB) at a time
    source = synthetic_cache(tmp_path / "big.h5", n=n, dim=dim)
    features_mb = n * dim * 4 / 2**20
    if fmt == "npy":
        pool = previous = None
    else:
        previous = pa.default_memory_pool()
        pool = pa.proxy_memory_pool(previous)  # Arrow's buffers are not seen by tracemalloc: count them apart
        pa.set_memory_pool(pool)
    tracemalloc.start()
    try:
        export(source, fmt, tmp_path / "out", chunk_rows=1024, rows_per_file=n // 2 if fmt == "parquet" else None)
        traced_mb = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
        if previous is not None:
            pa.set_memory_pool(previous)
    arrow_mb = pool.max_memory() / 2**20 if pool is not None else 0.0
    assert traced_mb < features_mb / 8, f"export held {traced_mb:.1f} MB for {features_mb:.0f} MB of features"
    assert arrow_mb < features_mb / 8, f"Arrow held {arrow_mb:.1f} MB for {features_mb:.0f} MB of features"


@needs_pyarrow
def test_earlier_export_is_refused_then_overwritten(tmp_path: Path) -> None:
    source = synthetic_cache(tmp_path / "c.h5", n=10, dim=4)
    out = tmp_path / "pq"
    export(source, "parquet", out, rows_per_file=3)
    (out / "mine.txt").write_text("keep")
    with pytest.raises(TlfeatError, match="earlier export"):
        export(source, "parquet", out)
    summary = export(source, "parquet", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt", "part-00000.parquet"]
    assert len(summary.files) == 1


@pytest.mark.parametrize(
    "setup, message",
    [("missing", "cache file not found"), ("format", "`format='csv'`: use parquet or npy"),
     ("out-file", "is a file"), ("not-h5", "not a readable HDF5 cache")],
)
def test_bad_input_is_one_line_error(tmp_path: Path, setup: str, message: str) -> None:
    source = tmp_path / "c.h5"
    if setup in ("format", "out-file"):
        synthetic_cache(source, n=4, dim=4)
    if setup == "not-h5":
        source.write_text("hello")
    out = tmp_path / "out"
    if setup == "out-file":
        out.write_text("x")
    with pytest.raises(TlfeatError, match=message):
        export(source, "csv" if setup == "format" else "npy", out)
    assert out.is_file() if setup == "out-file" else not out.exists()  # before: a failed read left out/ empty


def test_rows_per_file_with_npy_is_refused(tmp_path: Path) -> None:
    source = synthetic_cache(tmp_path / "c.h5", n=4, dim=4)  # before: ignored, one file written
    with pytest.raises(TlfeatError, match="`rows_per_file=1000`: applies to parquet only"):
        export(source, "npy", tmp_path / "out", rows_per_file=1000)
    assert not (tmp_path / "out").exists()


def test_an_export_inside_the_caches_dataset_is_refused(tmp_path: Path) -> None:
    # Before: written there, and the next extract of the dataset failed ("tiny/exp: class folder holds no images").
    data = tmp_path / "data"
    (data / "class_a").mkdir(parents=True)
    source = write_synthetic_cache(tmp_path / "c.h5", n_per_class=4, dim=4, dataset_root=str(data))
    with pytest.raises(TlfeatError, match=r"data/exp: inside the dataset folder .* pass `out` elsewhere"):
        export(source, "npy", data / "exp")
    assert sorted(p.name for p in data.iterdir()) == ["class_a"]


def test_missing_pyarrow_is_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = synthetic_cache(tmp_path / "c.h5", n=4, dim=4)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(TlfeatError, match=r"`format='parquet'` needs pyarrow.*pip install"):
        export(source, "parquet", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    export(source, "npy", tmp_path / "out")  # npy needs no pyarrow



@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_export_reports_progress_over_the_rows_unless_asked_not_to(
    tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture
) -> None:
    # Before: a million-row export ran 75-156 s without a word, and `export` had no -q like the other commands.
    if fmt == "parquet" and pa is None:
        pytest.skip("pyarrow is not installed (pip install 'tlfeat[export]')")
    source = synthetic_cache(tmp_path / "c.h5", n=30, dim=4)
    export(source, fmt, tmp_path / "shown", chunk_rows=7)
    passes = ["export parquet"] if fmt == "parquet" else ["export features.npy", "export rows.csv"]
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in lines] == passes and all("30/30 rows (100%)" in line for line in lines)
    export(source, fmt, tmp_path / "quiet", progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_cli_export_and_its_one_line_errors(tmp_path: Path) -> None:
    source = synthetic_cache(tmp_path / "c.h5", n=30, dim=4)
    result = run_cli("export", str(source), "--format", "npy", "--out", str(tmp_path / "np"))
    assert result.returncode == 0, result.stderr
    assert f"{tmp_path / 'np'}: 30 rows x 4 dims as npy in 3 files" in result.stdout
    assert "export rows.csv: 30/30 rows (100%)" in result.stderr
    result = run_cli("export", str(source), "--format", "npy", "--out", str(tmp_path / "np"), "--overwrite", "-q")
    assert result.returncode == 0 and not result.stderr, result.stderr
    for args, message in [(["--format", "csv"], "error: --format csv: use parquet or npy"),
                          (["--format", "npy", "--chunk-rows", "0"], "error: --chunk-rows 0: must be at least 1"),
                          (["--format", "npy"], "holds an earlier export (features.npy); pass --overwrite")]:
        result = run_cli("export", str(source), "--out", str(tmp_path / "np"), *args)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], result.stderr


def test_an_export_that_fails_while_reading_leaves_no_empty_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: a damaged cache failed (one line, as it should) but left exports/<name>/ behind, empty.
    import tlfeat.apps.export as export_module

    def damaged(*args: object) -> None:
        raise TlfeatError("c.h5: features damaged (checksum)")

    monkeypatch.setattr(export_module, "_export_npy", damaged)
    source = synthetic_cache(tmp_path / "c.h5", n=4, dim=4)
    with pytest.raises(TlfeatError, match="checksum"):
        export(source, "npy", tmp_path / "exports" / "c")
    assert not (tmp_path / "exports" / "c").exists()


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_a_cache_with_a_nan_row_is_refused_naming_the_image(tmp_path: Path, fmt: str) -> None:
    # Before: exported without complaint, its metadata saying rows_finite: True.
    if fmt == "parquet" and pa is None:
        pytest.skip("pyarrow not installed")
    source = plant_features(synthetic_cache(tmp_path / "c.h5", n=30, dim=4), ((17, 1), np.nan))
    with pytest.raises(TlfeatError, match=r'c\.h5: NaN or infinite features \(image [^/]+/img "17",x\.png\)'):
        export(source, fmt, tmp_path / "out", chunk_rows=8)
    assert not (tmp_path / "out").exists()


@needs_pyarrow
def test_an_overwrite_that_fails_keeps_the_earlier_export(tmp_path: Path) -> None:
    # Before: --overwrite deleted the earlier export first: a stopped or failed run left neither.
    source = synthetic_cache(tmp_path / "c.h5", n=30, dim=4)
    out = tmp_path / "pq"
    first = export(source, "parquet", out, rows_per_file=10)
    before = {p.name: p.read_bytes() for p in first.files}
    plant_features(source, ((25, 0), np.inf))
    with pytest.raises(TlfeatError, match="NaN or infinite"):
        export(source, "parquet", out, overwrite=True, chunk_rows=5)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    plant_features(source, ((25, 0), 1.0))
    export(source, "npy", out, overwrite=True)  # the other format: the earlier parts go once it is written
    assert sorted(p.name for p in out.iterdir()) == ["features.npy", "meta.json", "rows.csv"]
