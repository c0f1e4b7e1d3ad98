"""Outputs: one that cannot be written is a one-line error before the work starts (not a traceback after
it), a write that fails later is one line too, as is a Ctrl-C, and nothing is ever written inside the dataset."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import assert_one_line_error, write_synthetic_cache
from tlfeat import reports
from tlfeat.cli import app
from tlfeat.errors import TlfeatError
from tlfeat.heads import fit as heads_fit
from tlfeat.heads.fit import fit_heads

runner = CliRunner()
FAST = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32", "-q"]


def test_extract_refuses_an_output_inside_the_dataset(tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: run from inside the dataset, extract wrote cache/ there (exit 0); every later scan then failed
    # on "cache: class folder holds no images", or read tlfeat's own files as a class.
    before = sorted(tiny_dataset.rglob("*"))
    monkeypatch.chdir(tiny_dataset)
    result = runner.invoke(app, ["extract", ".", *FAST])
    assert_one_line_error(result, "inside the dataset folder", "pass --out elsewhere")
    result = runner.invoke(app, ["extract", str(tiny_dataset), "--out", str(tiny_dataset / "c" / "x.h5"), *FAST])
    assert_one_line_error(result, "inside the dataset folder")
    assert sorted(tiny_dataset.rglob("*")) == before


def test_fit_head_refuses_an_output_inside_the_dataset(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    cache = write_synthetic_cache(tmp_path / "c.h5", dataset_root=str(data))
    with pytest.raises(TlfeatError, match="inside the dataset folder"):
        fit_heads([cache], head="logreg", out=data / "heads")
    assert list(data.iterdir()) == []


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fitted")
    cache = write_synthetic_cache(root / "c.h5")
    fit_heads([cache], head="logreg", out=root / "heads")
    return cache, root / "heads" / "logreg.skops"


@pytest.mark.parametrize("command", ["export", "evaluate", "compare", "map", "fit-head"])
def test_an_output_that_cannot_be_written_is_one_line_before_the_work(
    command: str, fitted: tuple[Path, Path], tmp_path: Path
) -> None:
    # Before: export, evaluate --json, compare --csv and map ended in a traceback (NotADirectoryError,
    # IsADirectoryError), after the work.
    cache, head = fitted
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    a_folder = tmp_path / "a-folder"
    a_folder.mkdir()
    args = {
        "export": ["export", cache, "--format", "npy", "--out", a_file / "sub"],
        "evaluate": ["evaluate", head, cache, "--json", a_folder],
        "compare": ["compare", head.parent, "--csv", a_folder],
        "map": ["map", cache, "--method", "pca", "--out", a_file],
        "fit-head": ["fit-head", cache, "--head", "logreg", "--out", a_file],
    }[command]
    result = runner.invoke(app, [str(a) for a in args])
    assert_one_line_error(result, str(a_file if command in ("export", "map", "fit-head") else a_folder))
    assert sorted(tmp_path.iterdir()) == [a_file, a_folder] and list(a_folder.iterdir()) == []
    assert "table" not in result.stdout and "| test |" not in result.stdout  # refused before the work


@pytest.mark.parametrize("option", ["compare --png", "compare --csv", "evaluate --json", "predict --csv"])
def test_a_file_option_never_replaces_a_file_of_another_kind(option: str, fitted: tuple[Path, Path],
                                                              tmp_path: Path) -> None:
    # Before: `--png cache.h5` or `--csv photo.jpg` overwrote the cache or the photo, and said "wrote".
    cache, head = fitted
    victim = tmp_path / "photo.jpg"
    victim.write_bytes(b"\xff\xd8 a photo")
    command, flag = option.split()
    args = {"compare": ["compare", head.parent], "evaluate": ["evaluate", head, cache],
            "predict": ["predict", head, victim]}[command]
    result = runner.invoke(app, [str(a) for a in args] + [flag, str(victim)])
    assert_one_line_error(result, str(victim), f"exists and is not a .{flag[2:]} file", "give a new name")
    assert victim.read_bytes() == b"\xff\xd8 a photo"
    same_kind = tmp_path / f"old.{flag[2:]}"  # a file of its own kind is replaced, as a rerun does
    same_kind.write_text("old")
    if command != "predict":  # (the "photo" here is no image to predict on)
        result = runner.invoke(app, [str(a) for a in args] + [flag, str(same_kind)])
        assert result.exit_code == 0 and same_kind.read_bytes() != b"old", result.output


def test_a_write_that_fails_after_the_checks_is_one_line(
    fitted: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full disk found only while writing: the OSError reached the user as a traceback.
    def full_disk(path: Path, payload: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(reports, "atomic_write_bytes", full_disk)
    result = runner.invoke(app, ["compare", str(fitted[1].parent), "--csv", str(tmp_path / "table.csv")])
    assert_one_line_error(result, f"{tmp_path / 'table.csv'}: no space left on the device")


def test_ctrl_c_in_a_command_without_its_own_message_is_one_line(
    fitted: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: fit-head and predict ended with exit 130 and nothing said.
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(heads_fit, "fit_heads", interrupted)
    result = runner.invoke(app, ["fit-head", str(fitted[0]), "--out", str(tmp_path / "heads")])
    assert_one_line_error(result, "interrupted; the files already written are kept")

    def interrupted_in_tensorflows_import(*args: object, **kwargs: object) -> None:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:  # a compiled module's initialisation, as TensorFlow's pywrap modules do it
            raise ImportError("initialization failed")

    monkeypatch.setattr(heads_fit, "fit_heads", interrupted_in_tensorflows_import)  # before: a traceback
    result = runner.invoke(app, ["fit-head", str(fitted[0]), "--out", str(tmp_path / "heads")])
    assert_one_line_error(result, "interrupted; the files already written are kept")


def test_output_cut_short_by_its_reader_is_not_an_error(tmp_path: Path) -> None:
    # Before: `tlfeat predict RUN FOLDER | head -3` printed "error: Broken pipe".
    import subprocess
    import sys

    from conftest import REPO, child_env

    script = ("import sys\nfrom tlfeat.cli.common import user_errors\n"
              "@user_errors\ndef talk():\n    for i in range(200000):\n        print('line', i)\n"
              "import typer\ntry:\n    talk()\nexcept typer.Exit as exc:\n    sys.exit(exc.exit_code)\n"
              "except BaseException as exc:\n    sys.exit(f'escaped: {exc!r}')\n")
    reader = "import sys; sys.stdin.readline()"
    talk = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=REPO, env=child_env())
    subprocess.run([sys.executable, "-c", reader], stdin=talk.stdout, timeout=60)
    talk.stdout.close()
    stderr = talk.stderr.read().decode()
    assert talk.wait(timeout=60) == 141
    assert "error" not in stderr and "Traceback" not in stderr and "escaped" not in stderr, stderr


def test_errors_name_the_option_and_the_kind_of_path_given(
    fitted: tuple[Path, Path], tiny_dataset: Path, tmp_path: Path
) -> None:
    # Before: --csv, --json and --png given a folder each said "--out needs a file path"; a folder as
    # --weights or as evaluate's model was "not found"; similar --nprobe 0 ended in a faiss traceback.
    cache, model = fitted
    folder = tmp_path / "folder"
    folder.mkdir()
    for command in (["compare", str(model.parent), "--png", str(folder)], ["compare", str(model.parent), "--csv", str(folder)],
                    ["evaluate", str(model), str(cache), "--json", str(folder)]):
        option = command[-2]
        assert_one_line_error(runner.invoke(app, command), f"{option} needs a file path")
    assert_one_line_error(runner.invoke(app, ["extract", str(tiny_dataset), "--out", str(tmp_path / "x.h5"),
                                              "--weights", str(folder)]), "is a folder; --weights takes")
    assert_one_line_error(runner.invoke(app, ["evaluate", str(folder), str(cache)]), "is a folder, not a head file")
    for nprobe in ("0", "-5"):
        assert_one_line_error(runner.invoke(app, ["similar", str(cache), "class_0/img_0000.png", "--index", "faiss",
                                                  "--nprobe", nprobe]), f"--nprobe {nprobe}: must be at least 1")


def test_a_long_cause_is_cut_at_a_word_and_says_so() -> None:
    # Before: cut at 160 characters mid-word, "... legacy H5 format files (`.h5` extension), or Orba)".
    from tlfeat.fileio import describe_exception

    cause = "File format not supported: filepath=/etc/passwd. Keras 3 only supports V3 `.keras` files and " \
            "legacy H5 format files (`.h5` extension), or Orbax checkpoints (a folder)."
    described = describe_exception(ValueError(cause))
    assert described.endswith(" ...") and described[:-4] == f"ValueError: {cause[:described.index(' ...') - 12]}"
    assert described[:-4].split()[-1] in cause.split()
