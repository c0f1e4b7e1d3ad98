"""Head files you can trust: nothing runs from a model file without --trust, no side file to drift,
one writer per folder, a kill leaves every head whole, and the summary covers every head."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from typer.testing import CliRunner

from cli import app
from conftest import (
    TRAINABLE_SEED, assert_one_line_error, child_env, gaussian_blobs, make_dataset, summary_rows, write_synthetic_cache,
)
from tlfeat.extraction.run import extract
from tlfeat.fileio import sha256_file
from tlfeat.heads.fit import fit_heads
from tlfeat.heads.registry import HEADS, STREAMING_SUFFIX, fit_estimator
from tlfeat.heads.store import load_head, save_head

runner = CliRunner()


class Trap(LogisticRegression):
    """A classifier whose loading runs code: it touches the file named by TLFEAT_TRAP."""

    def __setstate__(self, state: dict) -> None:
        Path(os.environ["TLFEAT_TRAP"]).touch()
        super().__setstate__(state)


class Exploit:
    """A pickle that runs code when loaded (what a shared .joblib can carry)."""

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {os.environ['TLFEAT_TRAP']}",)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return write_synthetic_cache(tmp_path / "blobs.h5")


@pytest.fixture
def trap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    marker = tmp_path / "PWNED"
    monkeypatch.setenv("TLFEAT_TRAP", str(marker))
    return marker


def legacy_head(path: Path, estimator: object, cache: Path) -> Path:
    """A head as tlfeat 0.1 wrote it: a pickle, and a JSON beside it vouching for its sha256."""
    joblib.dump(estimator, path)
    meta = {
        "format": "tlfeat-head", "format_version": 1, "model_file": path.name, "model_sha256": sha256_file(path),
        "head": "logreg", "classes": ["class_0", "class_1", "class_2"], "feature_dim": 16,
        "sources": [{"path": str(cache), "file": cache.name, "backbone": "efficientnet_lite0", "weights": "none",
                     "weights_source": "none", "input_size": 32, "preprocessing": "synthetic", "feature_dim": 16}],
        "params": {"C": 0.1}, "scores": {}, "fit_seconds": 0.1, "search_seconds": None,
    }
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


def test_a_pickle_with_matching_sha256_runs_nothing_and_loads_only_with_trust(
    cache: Path, trap: Path, tmp_path: Path
) -> None:
    model = legacy_head(tmp_path / "logreg.joblib", Exploit(), cache)
    for command in (["evaluate", str(model), str(cache)], ["predict", str(model), str(cache)]):
        result = runner.invoke(app, command)
        assert not trap.exists()
        assert_one_line_error(result, "logreg.joblib", "refit it", "--trust")

    # A tlfeat 0.1 head you made yourself still loads, with --trust.
    X, y = gaussian_blobs(40, 3, 16)
    mine = legacy_head(tmp_path / "mine.joblib", LogisticRegression().fit(X, y), cache)
    result = runner.invoke(app, ["evaluate", str(mine), str(cache), "--trust"])
    assert result.exit_code == 0, result.output
    assert "| test | 30 |" in result.stdout
    # compare reads its JSON only; fit-head does not write new heads beside it.
    listed = runner.invoke(app, ["compare", str(mine)])
    assert listed.exit_code == 0 and "frozen + logreg" in listed.stdout and not trap.exists()
    assert_one_line_error(runner.invoke(app, ["fit-head", str(cache), "--out", str(tmp_path)]), "tlfeat 0.1")


def test_a_head_file_with_an_untrusted_type_is_refused_by_name_unless_trusted(
    cache: Path, trap: Path, tmp_path: Path
) -> None:
    good = fit_heads([cache], head="logreg", out=tmp_path / "heads").results[0].files["model"]
    estimator, meta = load_head(good)
    X, y = gaussian_blobs(40, 3, 16)
    model = tmp_path / "trap.skops"
    save_head(Trap().fit(X, y), model, meta, {})
    result = runner.invoke(app, ["evaluate", str(model), str(cache)])
    assert_one_line_error(result, "trap.skops", f"{__name__}.Trap", "--trust")
    assert not trap.exists()

    trusted = runner.invoke(app, ["evaluate", str(model), str(cache), "--trust"])
    assert trusted.exit_code == 0, trusted.output
    assert trap.exists()  # what --trust allows: the file's own code ran


@pytest.mark.slow
def test_the_class_list_lives_in_the_model_file_and_an_edit_is_refused(tmp_path: Path) -> None:
    # Before: reversing the class list in logreg.json made predict print wrong class names, exit 0.
    data = make_dataset(tmp_path / "data", n_classes=3, per_class=6)
    cache = extract(data, tmp_path / "small.h5", weights="none", image_size=32, seed=TRAINABLE_SEED,
                    progress=False).out
    model = fit_heads([cache], head="logreg", out=tmp_path / "heads").results[0].files["model"]
    original = model.read_bytes()
    assert original.count(b'"class_0"') and original.count(b'"class_2"')  # the names predict prints are inside
    swapped = original.replace(b'"class_0"', b'"class_X"').replace(b'"class_2"', b'"class_0"')
    model.write_bytes(swapped.replace(b'"class_X"', b'"class_2"'))
    assert_one_line_error(runner.invoke(app, ["evaluate", str(model), str(cache)]), model.name, "Bad CRC-32")
    # predict has no cache whose class list could disagree: the check on the file itself is what stops it.
    predicted = runner.invoke(app, ["predict", str(model), str(data / "class_0" / "img_000.png")])
    assert_one_line_error(predicted, model.name, "Bad CRC-32")


@pytest.mark.slow
def test_every_head_loads_without_trust(tmp_path: Path) -> None:
    X, y = gaussian_blobs(20, 3, 8)
    for name, spec in HEADS.items():
        estimator = spec.build(0)
        fit_estimator(estimator, X, y, (X, y))
        path = tmp_path / f"{name}.skops"
        save_head(estimator, path, {"head": name, "classes": ["a", "b", "c"], "feature_dim": 8}, {})
        loaded, _ = load_head(path)
        np.testing.assert_allclose(loaded.predict_proba(X), estimator.predict_proba(X), atol=1e-6)


def test_a_second_fit_head_on_the_same_folder_stops_at_once(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "heads"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from tlfeat.fileio import OutputLock
            with OutputLock({str(out)!r}):
                print("locked", flush=True)
                time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True, env=child_env(),
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = runner.invoke(app, ["fit-head", str(cache), "--head", "logreg", "--out", str(out)])
        assert_one_line_error(result, "heads.lock", "another tlfeat run")
        assert not out.exists() or not any(out.iterdir())
    finally:
        holder.kill()
        holder.wait()
    assert runner.invoke(app, ["fit-head", str(cache), "--head", "logreg", "--out", str(out)]).exit_code == 0


KILLER = """
import os, signal, sys
from pathlib import Path
from tlfeat.heads.fit import fit_heads

calls, kill_at = 0, int(sys.argv[3])
real_replace = os.replace

def replace(src, dst):
    global calls
    calls += 1
    if calls == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)

os.replace = replace
fit_heads([Path(sys.argv[1])], head="knn", search=True, out=Path(sys.argv[2]))
print(calls)
"""


@pytest.mark.slow
def test_a_kill_at_any_write_leaves_every_head_whole(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "heads"
    first = fit_heads([cache], head="knn", out=out).results[0]  # k=10; the searched run below picks k=20
    model = first.files["model"]
    kept = {p.name: p.read_bytes() for p in out.iterdir()}
    script = tmp_path / "kill.py"
    script.write_text(KILLER)

    def run(kill_at: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), str(cache), str(out), str(kill_at)],
                              capture_output=True, text=True, env=child_env(), timeout=300)

    writes = int(run(0).stdout.split()[-1])
    estimator, meta = load_head(model)
    assert writes >= 3 and meta["params"] == {"k": 20}
    for kill_at in range(1, writes + 1):
        for name, payload in kept.items():  # back to the k=10 head before every kill
            (out / name).write_bytes(payload)
        assert run(kill_at).returncode == -signal.SIGKILL
        estimator, meta = load_head(model)  # the old head or the new one, never a mix
        assert estimator.get_params()["kneighborsclassifier__n_neighbors"] == meta["params"]["k"] in (10, 20)


HALF_WRITER = """
import os, signal, sys
from pathlib import Path
from tlfeat.heads.fit import fit_heads

real_write = Path.write_bytes

def write_bytes(self, data):
    if self.name.startswith(".knn.tmp-"):  # half of the new head on disk, then the kill
        real_write(self, data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real_write(self, data)

Path.write_bytes = write_bytes
fit_heads([Path(sys.argv[1])], head="knn", search=True, out=Path(sys.argv[2]))
"""


def test_a_kill_in_the_middle_of_a_head_write_leaves_a_folder_fit_head_still_writes(cache: Path, tmp_path: Path) -> None:
    # Before: the half-written .knn.tmp-<pid>.skops was read as a head, and every later fit-head into the folder
    # stopped with "not a readable head file".
    out = tmp_path / "heads"
    fit_heads([cache], head="knn", out=out)
    script = tmp_path / "half.py"
    script.write_text(HALF_WRITER)
    killed = subprocess.run([sys.executable, str(script), str(cache), str(out)], capture_output=True, text=True,
                            env=child_env(), timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert list(out.glob(".knn.tmp-*.skops")), "the kill left its half-written head"
    assert load_head(out / "knn.skops")[1]["params"] == {"k": 10}  # the old head, whole

    result = runner.invoke(app, ["fit-head", str(cache), "--head", "knn", "--search", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert load_head(out / "knn.skops")[1]["params"] == {"k": 20} and set(summary_rows(out)) == {"knn"}
    assert not list(out.glob(".*"))  # the leftover is gone


def test_the_summary_covers_every_head_and_a_replaced_head_is_reported(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "heads"
    for head in ("logreg", "knn"):
        assert runner.invoke(app, ["fit-head", str(cache), "--head", head, "--out", str(out)]).exit_code == 0
    result = runner.invoke(app, ["fit-head", str(cache), "--head", "knn", "--search", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "replaced knn" in result.stdout and "k=10" in result.stdout
    rows = summary_rows(out)
    assert set(rows) == {"logreg", "knn"} and rows["knn"]["params"].startswith("k=20")
    assert "| logreg |" in (out / "summary.md").read_text()


def test_streaming_heads_share_the_folder_and_its_summary(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "heads"
    fit_heads([cache], head="logreg", out=out)
    result = runner.invoke(app, ["fit-head", str(cache), "--streaming", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert set(summary_rows(out)) == {"logreg", "logreg" + STREAMING_SUFFIX}


def test_a_damaged_head_file_says_how_to_go_on_and_refitting_that_head_replaces_it(tmp_path: Path) -> None:
    # Before: "not a readable head file" blocked refitting that very head and compare over any tree holding it,
    # without a word on how to go on.
    cache = write_synthetic_cache(tmp_path / "c.h5")
    out = tmp_path / "heads"
    fit_heads(cache, head=["logreg", "knn"], out=out)
    (out / "knn.skops").write_bytes(b"damaged")
    for result in (runner.invoke(app, ["fit-head", str(cache), "--head", "logreg", "--out", str(out)]),
                   runner.invoke(app, ["compare", str(tmp_path)])):
        assert_one_line_error(result, "knn.skops: not a readable head file", "move or remove that file, or fit "
                              "that head again into its folder, which replaces it")
    refit = runner.invoke(app, ["fit-head", str(cache), "--head", "knn", "--out", str(out)])
    assert refit.exit_code == 0, refit.output
    assert "replaced knn.skops (was a damaged file)" in refit.output
    assert runner.invoke(app, ["compare", str(tmp_path)]).exit_code == 0


def test_a_head_damaged_inside_its_model_is_not_listed_as_kept(tmp_path: Path) -> None:
    # Before: a byte flipped in the model (not in the metadata) passed fit-head's "kept from earlier runs" and
    # compare ranked the head; only predict and evaluate then failed on its CRC-32.
    cache = write_synthetic_cache(tmp_path / "c.h5")
    out = tmp_path / "heads"
    fit_heads(cache, head=["logreg", "knn"], out=out)
    path = out / "logreg.skops"
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        member = next(i for i in archive.infolist() if i.filename == "schema.json")
    header = member.header_offset  # the local header: 30 bytes, then the name and its own extra field
    start = header + 30 + int.from_bytes(raw[header + 26 : header + 28], "little") \
        + int.from_bytes(raw[header + 28 : header + 30], "little")
    raw[start + member.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    for result in (runner.invoke(app, ["fit-head", str(cache), "--head", "knn", "--out", str(out)]),
                   runner.invoke(app, ["compare", str(out)])):
        assert_one_line_error(result, "logreg.skops", "move or remove that file")
