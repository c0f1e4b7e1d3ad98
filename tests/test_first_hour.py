"""What a new user meets first: a quiet start, progress that suits the terminal or the log file, help that
matches the parser, summaries whose numbers add up, `import tlfeat` beside a clone, `tlfeat doctor`."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO, child_env, extract_run_counts, make_dataset, make_image, run_cli
from tlfeat.cli import app
from tlfeat.extraction.run import ExtractSummary
from tlfeat.progress import ProgressLines, _tqdm_class, progress_bar
from tlfeat.quiet_import import without_notes

runner = CliRunner()
BANNER = ("oneDNN", "absl::InitializeLog", "cpu_feature_guard", "rebuild TensorFlow")
FAST = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32"]


def _env_without_log_level() -> dict[str, str]:
    """A user's environment: no TF_CPP_MIN_LOG_LEVEL, this checkout's tlfeat."""
    env = child_env()
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


# --- the TensorFlow banner ---------------------------------------------------------------------


@pytest.mark.slow
def test_importing_keras_after_tlfeat_prints_no_tensorflow_banner() -> None:
    result = subprocess.run([sys.executable, "-c", "import tlfeat, keras, tensorflow; print(tensorflow.__loader__)"],
                            capture_output=True, text=True, env=_env_without_log_level(), timeout=300)
    assert result.returncode == 0, result.stderr
    assert not any(note in result.stderr for note in BANNER), result.stderr
    assert "_QuietLoader" not in result.stdout  # tensorflow keeps its real loader


def _import_a_fake_tensorflow(
    tmp_path: Path, body: str, script: str = "import tlfeat, tensorflow"
) -> subprocess.CompletedProcess:
    """`script` (default `import tlfeat, tensorflow`) in a child process, where tensorflow is a package running
    `body`."""
    fake = tmp_path / "site" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(body)
    env = {**_env_without_log_level(), "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{REPO}"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120, cwd=tmp_path)  # an abort's core file, if any, lands there


def test_the_import_filter_keeps_every_other_line_and_the_error(tmp_path: Path) -> None:
    result = _import_a_fake_tensorflow(
        tmp_path,
        "import os, sys\n"
        "os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n')\n"
        "os.write(2, b'I0000 00:00:1795718969.082513   16904 port.cc:153] oneDNN custom operations are on.\\n')\n"
        "os.write(2, b'E0000 00:00:1795718969.1 16904 loader.cc:1] a real native error\\n')\n"
        "print('a Python warning', file=sys.stderr)\n"
        "raise ImportError('libcuda.so: cannot open shared object file')\n",
    )
    assert result.returncode == 1
    assert "a real native error" in result.stderr and "a Python warning" in result.stderr
    assert "ImportError: libcuda.so: cannot open shared object file" in result.stderr
    assert "oneDNN" not in result.stderr and "absl::InitializeLog" not in result.stderr


def test_a_look_up_of_tensorflow_before_its_import_keeps_the_filter(tmp_path: Path) -> None:
    # Before: torch asks importlib.util.find_spec("tensorflow") whether it is installed; that look-up took the
    # filter away, and the real import later (keras.utils.set_random_seed) printed the banner under torch.
    result = _import_a_fake_tensorflow(
        tmp_path,
        "import os\n"
        "os.write(2, b'I0000 00:00:1795718969.082513   16904 port.cc:153] oneDNN custom operations are on.\\n')\n"
        "os.write(2, b'a line of its own\\n')\n",
        script="import importlib.util, tlfeat; assert importlib.util.find_spec('tensorflow'); import tensorflow",
    )
    assert result.returncode == 0, result.stderr
    assert "a line of its own" in result.stderr and "oneDNN" not in result.stderr


def test_an_import_that_kills_the_process_still_says_why(tmp_path: Path) -> None:
    # Before: the captured text was replayed after the import; an abort (a CPU without AVX) lost it all.
    result = _import_a_fake_tensorflow(
        tmp_path,
        "import os\n"
        "os.write(2, b'I0000 00:00:1795718969.082513   16904 port.cc:153] oneDNN custom operations are on.\\n')\n"
        "os.write(2, b'F0000 00:00:1.2 1 cpu_feature_guard.cc:39] compiled to use AVX, not available\\n')\n"
        "os.abort()\n",
    )
    assert result.returncode != 0
    assert "compiled to use AVX, not available" in result.stderr and "oneDNN" not in result.stderr


def test_only_the_start_up_notes_are_dropped() -> None:
    text = (
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
        "I0000 00:00:1795718807.474507   14019 cpu_feature_guard.cc:227] This TensorFlow binary is optimized\n"
        "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the "
        "appropriate compiler flags.\n"
        "2025-09-17 14:44:05.157831: I external/local_xla/xla/tsl/cuda/cudart_stub.cc:32] Could not find cuda\n"
        "W0000 00:00:1.2 1 allocator.cc:1] Allocation exceeds 10% of free system memory.\n"
        "Traceback (most recent call last):\n"
    )
    assert without_notes(text) == (
        "W0000 00:00:1.2 1 allocator.cc:1] Allocation exceeds 10% of free system memory.\n"
        "Traceback (most recent call last):\n"
    )


# --- progress in a terminal and in a file ---------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_in_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", _Terminal())
    with progress_bar(10, True, "x") as bar:
        assert not isinstance(bar, ProgressLines)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with progress_bar(10, True, "x") as bar:
        assert isinstance(bar, ProgressLines)
        bar.update(10)
    assert sys.stderr.getvalue().startswith("x: 10/10 images (100%)")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with progress_bar(10, False, "x") as bar:  # quiet: silent anywhere
        bar.update(10)
    assert sys.stderr.getvalue() == ""


def test_a_bar_outside_a_notebook_leaves_tqdm_auto_and_asyncio_unimported() -> None:
    # tqdm.auto imported asyncio, ssl and email to look for a notebook: 3.5 MB in every run with progress.
    code = ("import sys; from tlfeat.progress import progress_bar\n"
            "with progress_bar(2, True, 'x') as bar: bar.update(2)\n"
            "print(sorted({'asyncio', 'tqdm.auto'} & set(sys.modules)))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert run.stdout.strip() == "[]"


def test_a_notebook_kernel_still_gets_tqdm_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    import tqdm.auto

    monkeypatch.setitem(sys.modules, "IPython", types.ModuleType("IPython"))  # a kernel has imported it
    assert _tqdm_class() is tqdm.auto.tqdm



def test_progress_lines_are_whole_lines_every_few_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([100.0, 101.0, 111.0, 112.0, 125.0, 130.0])
    monkeypatch.setattr("tlfeat.progress.time.monotonic", lambda: next(clock))
    out = io.StringIO()
    with ProgressLines(400, "extract x", every_s=10, stream=out) as bar:  # starts at t=100
        for _ in range(4):  # t = 101 (too soon), 111 (a line), 112 (too soon), 125 (the last batch: no line)
            bar.update(100)
    assert "\r" not in out.getvalue()
    assert out.getvalue().splitlines() == [
        "extract x: 200/400 images (50%), 18.2 images/s, about 0:11 left",
        "extract x: 400/400 images (100%), 13.3 images/s, 30.0 s",
    ]


@pytest.mark.slow
def test_extract_to_a_log_file_writes_no_carriage_returns(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "d", n_classes=2, per_class=6)
    result = run_cli("extract", str(data), "--out", str(tmp_path / "c.h5"), *FAST, "--batch-size", "4")
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "\r" not in result.stdout
    assert result.stderr.splitlines()[-1].startswith("extract vgg16: 12/12 images (100%)")
    assert not any(note in result.stderr for note in BANNER), result.stderr


def test_progress_lines_name_their_unit_and_can_leave_the_last_line_to_the_caller() -> None:
    out = io.StringIO()
    with ProgressLines(3, "stage 1 epoch 2/20", every_s=0, stream=out, unit="batches", leave=False) as bar:
        bar.update(2)
        bar.update(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stage 1 epoch 2/20: 2/3 batches (67%), ")


# --- help and messages ---------------------------------------------------------------------------------


def _commands() -> dict[str, object]:
    import typer.main

    return typer.main.get_command(app).commands  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(_commands()))
def test_help_shows_what_the_parser_accepts(name: str) -> None:
    result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    assert result.exit_code == 0, result.output
    usage = next(line for line in result.output.splitlines() if "Usage:" in line).strip()
    command = _commands()[name]
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    expected = " ".join(
        ("{}" if p.required else "[{}]").format(p.name.upper()) + ("..." if p.nargs == -1 else "") for p in arguments
    )
    assert usage.endswith(f"{name} [OPTIONS] {expected}".rstrip()), usage
    assert "{" not in usage
    assert "<bool>" not in result.output and "BOOLEAN" not in result.output  # flags take no value


@pytest.mark.parametrize("name", sorted(_commands()))
def test_help_in_an_80_column_terminal_cuts_nothing_short(name: str) -> None:
    # Before: finetune's --out default was cut to "runs/<dataset>-<backbone>-top<K>-<timestam…".
    result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0 and "…" not in result.output, result.output


def test_a_flag_given_a_value_is_refused_as_the_help_implies(tmp_path: Path) -> None:
    result = runner.invoke(app, ["extract", str(tmp_path), "--quiet", "true"])
    assert result.exit_code == 2 and "true" in result.output


@pytest.mark.parametrize("args, words", [
    (["extract", "data", "--batch-size", "abc"], "Invalid value for '--batch-size'"),
    (["extrat"], "No such command 'extrat'"),
    (["extract", "data", "--bogus"], "No such option: --bogus"),
    (["fit-head"], "Missing argument"),
])
def test_a_usage_error_is_one_line_with_the_help_to_read(args: list[str], words: str) -> None:
    # Before: a usage line, a hint and a six-line box, unlike every other error.
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ") and words in result.stderr, result.stderr
    assert "--help'" in result.stderr


def test_the_bare_command_still_prints_its_help() -> None:
    result = runner.invoke(app, [])
    assert result.exit_code == 0 and "Usage:" in result.output and "extract" in result.output


def test_the_command_list_goes_the_way_a_new_user_does() -> None:
    # Before: the list began with fit-head, predict and evaluate, and extract came tenth, after the analyses.
    from tlfeat.cli.common import COMMAND_PANELS

    assert sorted(name for names in COMMAND_PANELS.values() for name in names) == sorted(_commands())
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "100"}, terminal_width=100)
    words = [line.strip("│ ").split(" ")[0] for line in result.output.splitlines()]
    panels = [line.strip("╭─ ").split(" ─")[0] for line in result.output.splitlines() if line.startswith("╭─ ")]
    assert panels == ["Options", *COMMAND_PANELS]
    assert [word for word in words if word in _commands()] == [n for names in COMMAND_PANELS.values() for n in names]


def test_extract_on_an_image_file_says_a_folder_of_class_folders_is_expected(tmp_path: Path) -> None:
    make_image(tmp_path / "photo.jpg", 0, 0)
    result = runner.invoke(app, ["extract", str(tmp_path / "photo.jpg")])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"error: {tmp_path / 'photo.jpg'}: is a file, not a dataset folder (expected a folder with one sub-folder "
        "of images per class)"
    )


def _summary(**fields: object) -> ExtractSummary:
    base = dict(out=Path("c.h5"), n_images=36, n_computed=39, n_embedded=36, n_reused=0, n_skipped=3,
                skipped=[], ignored=[("a.txt", "x")], feature_dim=512, seconds=2.0, images_per_s=19.5,
                split_counts={"train": 20, "val": 6, "test": 10})
    return ExtractSummary(**{**base, **fields})  # type: ignore[arg-type]


def test_the_extract_summary_counts_add_up() -> None:
    from tlfeat.cli.extract import summary_line

    assert summary_line(_summary()) == (
        "c.h5: 36 images x 512 dims (train 20, val 6, test 10), 3 image files skipped; this run: 39 attempted "
        "(36 embedded, 3 skipped), 0 reused; 1 ignored (1 x); 2.0 s, 19.5 images/s"
    )
    resumed = summary_line(_summary(n_computed=10, n_embedded=9, n_reused=29))
    assert extract_run_counts(resumed) == (10, 9, 1, 29)  # 36 rows + 3 skipped = 10 attempted + 29 reused
    assert "up to date, 39 reused, nothing attempted" in summary_line(
        _summary(n_computed=0, n_embedded=0, n_reused=39, up_to_date=True))


@pytest.mark.slow
def test_extract_with_unreadable_files_reports_counts_that_add_up(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "d", n_classes=2, per_class=5)
    (data / "class_0" / "broken.png").write_bytes(b"not a png")
    (data / "class_1" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "c.h5"
    first = run_cli("extract", str(data), "--out", str(out), *FAST, "-q")
    assert first.returncode == 0, first.stderr
    assert "c.h5: 10 images x 512 dims" in first.stdout and "2 image files skipped" in first.stdout
    assert extract_run_counts(first.stdout) == (12, 10, 2, 0)
    make_image(data / "class_0" / "new.png", 0, 99)
    again = run_cli("extract", str(data), "--out", str(out), *FAST, "-q")
    assert "11 images x 512 dims" in again.stdout and extract_run_counts(again.stdout) == (1, 1, 0, 12)


# --- import tlfeat from the folder that holds a clone named tlfeat -----------------------------------------


def test_import_tlfeat_from_the_folder_above_a_clone(tmp_path: Path) -> None:
    clone = tmp_path / "tlfeat"  # a clone's top level: the package, cli.py, cache/, tests/
    shutil.copytree(REPO / "tlfeat", clone / "tlfeat", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("__init__.py", "cli.py"):
        shutil.copy(REPO / name, clone / name)
    (clone / "cache").mkdir()
    (clone / "tests").mkdir()
    env = child_env()
    env.pop("PYTHONPATH")  # as a user would run it: the current folder first, then whatever is installed
    script = "import tlfeat, tlfeat.cache; print(tlfeat.__file__); print(tlfeat.cache.__file__); tlfeat.load"
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(clone / "tlfeat" / "__init__.py"), str(clone / "tlfeat" / "cache.py")]
    backbones = subprocess.run([sys.executable, "-m", "tlfeat", "backbones"], cwd=tmp_path, capture_output=True,
                               text=True, env=env, timeout=120)
    assert backbones.returncode == 0 and "default: efficientnet_lite0" in backbones.stdout, backbones.stderr


# --- doctor --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_doctor_reports_backend_devices_precision_workers_and_versions() -> None:
    result = run_cli("doctor")
    assert result.returncode == 0, result.stderr
    facts = dict(re.match(r"([^:]+):\s+(.*)", line).groups() for line in result.stdout.splitlines())
    assert facts["tlfeat"].startswith("0.1.0 from ") and facts["keras backend"].startswith("tensorflow")
    assert "CPU:0" in facts["devices"]
    assert re.fullmatch(r"computes in (float32, batch 32|mixed_bfloat16, batch 256) by default", facts["extraction"])
    assert re.fullmatch(r"\d+ processes by default \(\d+ of \d+ CPUs available to this process\)", facts["decoding"])
    assert "keras " in facts["versions"] and "numpy " in facts["versions"]
    assert "models (" in facts["keras weights"]  # $KERAS_HOME/models and what is downloaded there
    assert not any(note in result.stderr for note in BANNER), result.stderr


@pytest.mark.parametrize("command", ["doctor", "extract"])
def test_a_keras_backend_that_cannot_load_is_one_line_naming_it(command: str, tiny_dataset: Path,
                                                                  tmp_path: Path) -> None:
    # Before: KERAS_BACKEND=torch without torch installed (or a misspelt name) printed Keras' import traceback,
    # from doctor too, the command meant for checking the set-up.
    args = [command] if command == "doctor" else [command, str(tiny_dataset), "--out", str(tmp_path / "c.h5")]
    result = subprocess.run([sys.executable, str(REPO / "cli.py"), *args], capture_output=True, text=True,
                            timeout=300, env={**child_env(), "KERAS_BACKEND": "no-such-backend"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: Keras cannot load KERAS_BACKEND=no-such-backend: ValueError: Unable to import backend : "
        "no-such-backend; install that backend or set KERAS_BACKEND to one that is installed (tensorflow, jax "
        "or torch)"
    ], result.stderr


def test_doctor_says_why_a_present_gpu_is_unused(monkeypatch: pytest.MonkeyPatch) -> None:
    from tlfeat.apps import doctor

    monkeypatch.setattr(doctor, "_versions", lambda: [("tensorflow-cpu", "2.21.0")])
    assert "pip install 'tensorflow[and-cuda]'" in doctor._unused_gpu_reason("tensorflow")
