"""Reading finished fine-tune runs back: their summary (no Keras needed), their model, predictions with it.

Run folder: ``model.keras`` (best epoch by val accuracy), ``history.csv`` and
``history.json``, ``training.png``, ``metrics.json`` (per split: per-class scores
and confusion matrix), ``confusion.png`` (test split), ``test_outcomes.npz`` (the
prediction for each test image scored, `tlfeat.reports.ImageOutcomes`: what compare
pairs with another model's; runs finished before it have none) and ``summary.json``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tlfeat.backbones import get_backbone
from tlfeat.errors import TlfeatError
from tlfeat.fileio import OutputLock, check_format, describe_exception, read_json_object
from tlfeat.heads.store import HEAD_SUFFIX
from tlfeat.reports import ImageOutcomes

RUN_FORMAT = "tlfeat-finetune"
RUN_FORMAT_VERSION = 1
SUMMARY_NAME = "summary.json"
MODEL_NAME = "model.keras"
TEST_OUTCOMES_NAME = "test_outcomes.npz"
STATE_NAME = "state.json"
STATE_FORMAT = RUN_FORMAT + "-state"
RUNS_DIR = Path("runs")  # default parent of run folders: runs/<dataset>-<backbone>-top<k>-<timestamp>
# The method of a run whose best epoch, so its model.keras, came before stage 2 unfroze any layer of the base.
STAGE1_BEST_METHOD = "head on frozen base (best epoch in stage 1 of a fine-tune run)"


def run_lock(out: Path) -> OutputLock:
    """The lock a live run holds on its folder, ``<out>/run.lock``, from before its model is built to its end."""
    return OutputLock(out / "run")


def _run_files(path: Path) -> tuple[Path, Path]:
    """(model.keras, summary.json) for a run folder, its model.keras or its summary.json."""
    path = Path(path)
    if path.is_dir():
        return path / MODEL_NAME, path / SUMMARY_NAME
    if path.suffix == ".keras":
        return path, path.parent / SUMMARY_NAME
    if path.name == SUMMARY_NAME:
        return path.parent / MODEL_NAME, path
    raise TlfeatError(f"{path}: not a fine-tune run (give its folder, {MODEL_NAME} or {SUMMARY_NAME})")


def read_run_summary(path: Path) -> dict:
    """summary.json of a finished fine-tune run, checked to be one."""
    _, summary_path = _run_files(path)
    if not summary_path.is_file():
        heads = sorted(Path(path).glob(f"*{HEAD_SUFFIX}")) if Path(path).is_dir() else []
        if heads:  # a fit-head folder: the model is one of its files
            raise TlfeatError(f"{path}: a folder of heads, not a fine-tune run; give one of its head files, "
                              f"e.g. {heads[0]}")
        unfinished = unfinished_run(summary_path.parent)
        if unfinished:  # predict and evaluate say how far it got and how to finish it, as compare does
            raise TlfeatError(f"{summary_path.parent}: {unfinished}")
        raise TlfeatError(f"{path}: no {SUMMARY_NAME}; not a finished fine-tune run")
    summary = read_json_object(summary_path)
    check_format(summary_path, summary, RUN_FORMAT, RUN_FORMAT_VERSION, "a tlfeat fine-tune summary", "rerun it")
    return describe_saved_model(summary)


def read_run_test_outcomes(run_dir: Path) -> ImageOutcomes | None:
    """A finished run's outcome on each test image it scored; None for a run finished before runs kept them."""
    path = Path(run_dir) / TEST_OUTCOMES_NAME
    if not path.is_file():
        return None
    try:
        return ImageOutcomes.from_npz(path.read_bytes())
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise TlfeatError(f"{path}: unreadable ({describe_exception(exc)})") from None


def unfinished_run(folder: Path) -> str | None:
    """What `folder` is when it holds a fine-tune run that has not finished (its state.json, no summary.json):
    how far it got and how to resume it. None for any other folder."""
    folder = Path(folder)
    if (folder / SUMMARY_NAME).exists() or not (folder / STATE_NAME).is_file():
        return None
    state = read_json_object(folder / STATE_NAME)
    config, history = state.get("config"), state.get("history")
    if state.get("format") != STATE_FORMAT or not isinstance(config, dict) or not isinstance(history, list):
        return None
    planned = (config.get("epochs1") or 0) + ((config.get("epochs2") or 0) if config.get("unfreeze_top") != 0 else 0)
    holder = run_lock(folder).holder()
    if holder:  # "resume it" would be refused while its run is alive
        return (f"a fine-tune run still training ({holder}; {len(history)} of {planned} epochs so far); "
                "wait for it to finish")
    return (f"a fine-tune run that has not finished ({len(history)} of {planned} epochs); resume it with "
            f"`tlfeat finetune {config.get('dataset_root') or 'DATA'} --out {folder} --resume`")


def describe_saved_model(summary: dict) -> dict:
    """`summary` with the method and trainable parameters of the model the run saved, its best epoch's.

    A best epoch in stage 1 of a run whose stage 2 then ran is the head on the frozen base: its method says so and
    its trainable parameters are stage 1's (the head's). Summaries written before this was checked called such a
    model fine-tuned, with stage 2's parameters; read back, they are described as this one is.
    """
    stages, best = summary.get("stages"), summary.get("best_epoch")
    if isinstance(stages, dict) and isinstance(best, dict) and best.get("stage") == 1 \
            and (stages.get("2") or {}).get("epochs_run"):
        summary["method"] = STAGE1_BEST_METHOD
        summary["trainable_params"] = (stages.get("1") or {}).get("trainable_params")
    return summary


def load_finetuned(path: Path) -> tuple[Any, dict]:
    """(Keras model, summary dict) of a finished fine-tune run: its folder, model.keras or summary.json.

    Keras' safe mode stays on: a .keras file runs no code of its own (no lambda layers).
    """
    import keras

    model_path, _ = _run_files(path)
    summary = read_run_summary(path)
    if not model_path.is_file():
        raise TlfeatError(f"{model_path}: model file not found")
    spec = get_backbone(summary["backbone"])
    if spec.preprocessing != summary["preprocessing"]:
        raise TlfeatError(
            f"{model_path}: trained with preprocessing {summary['preprocessing']!r}, "
            f"this tlfeat's {spec.name} uses {spec.preprocessing!r}"
        )
    from tlfeat.finetuning.model import inference_mode_layer

    inference_mode_layer()  # registered for loading
    try:
        model = keras.saving.load_model(model_path, compile=False)
    except Exception as exc:  # any failure to read the file is the file's problem
        raise TlfeatError(f"{model_path}: cannot load ({describe_exception(exc)})") from None
    return model, summary


def predict_files(
    run_or_model_path: Path, files: Sequence[str | Path], batch_size: int | None = None, progress: bool = False
) -> tuple[np.ndarray, list[int], list[tuple[str, str]], list[str]]:
    """Classify image files with a fine-tuned run: (probabilities (n_ok, C), ok indices, failures, class names).

    batch_size: default 256 on a GPU, 32 on a CPU.
    """
    from tlfeat.runtime import accelerator_present, default_batch_size

    model, summary = load_finetuned(run_or_model_path)
    spec = get_backbone(summary["backbone"])
    batch_size = default_batch_size(batch_size, accelerator_present())
    result = predict_with_model(model, files, int(summary["image_size"]), spec, batch_size, progress)
    return result.outputs, result.ok, result.failures, list(summary["classes"])


def predict_with_model(
    model: Any, files: Sequence[str | Path], image_size: int, spec: Any, batch_size: int, progress: bool = False
) -> Any:
    """Class probabilities of the decodable files (`tlfeat.runtime.BatchOutputs`)."""
    from tlfeat.runtime import CompiledModel, apply_to_files

    compiled = CompiledModel(model, spec.preprocessor.mode, image_size, batch_size)
    return apply_to_files(
        files, image_size, batch_size, compiled.submit, int(model.output.shape[-1]), progress, f"predict {spec.name}"
    )
