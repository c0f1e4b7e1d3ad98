"""A fine-tune run folder: its config, its state (history, best epoch, per-stage progress) and files.

While running, ``checkpoints/`` holds the best epoch so far and the latest one
(model and optimizer, ``.keras``) and ``state.json`` names them; all are
replaced atomically after every epoch, so ``--resume`` after Ctrl-C or a kill
continues from the last finished epoch.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

from tlfeat.data.scan import DatasetScan
from tlfeat.errors import TlfeatError
from tlfeat.fileio import read_json_object
from tlfeat.finetuning.model import save_model_atomically
from tlfeat.finetuning.runs import RUN_FORMAT, RUNS_DIR, STATE_NAME
from tlfeat.reports import write_csv, write_json

HISTORY_FIELDS = (
    "global_epoch", "stage", "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds",
)
# Settings that may differ on resume (to extend a run); everything else in the config must match.
RESUMABLE_CHANGES = ("epochs1", "epochs2", "patience")

Log = Callable[[str], None]


class Run:
    """One run folder: its config, state (history, best epoch, per-stage progress) and files."""

    def __init__(self, out: Path, config: dict, state: dict, log: Log) -> None:
        self.out = out
        self.config = config
        self.state = state
        self.log = log
        self.failures: dict[str, str] = dict(state.get("skipped", {}))
        self._failure_lock = threading.Lock()

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    def last_checkpoint(self) -> Path | None:
        name = self.state.get("last_checkpoint")
        return self.checkpoints / name if name else None

    def remove_stale_checkpoints(self) -> None:
        """Delete checkpoint files the state no longer names (older epochs, or left by a kill)."""
        keep = {self.state.get("last_checkpoint"), (self.state.get("best") or {}).get("file")}
        for path in self.checkpoints.glob("*.keras"):
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def global_epochs(self) -> int:
        return len(self.state["history"])

    def stage_state(self, stage: int) -> dict:
        return self.state["stages"][str(stage)]

    def note_failure(self, path: Path, reason: str) -> None:
        relpath = Path(path).relative_to(self.config["dataset_root"]).as_posix()
        with self._failure_lock:
            if relpath in self.failures:
                return
            self.failures[relpath] = reason
        self.log(f"  skipped {relpath}: {reason}")

    def save_state(self) -> None:
        with self._failure_lock:  # decoding threads may be adding failures right now
            self.state["skipped"] = dict(self.failures)
        write_json(self.out / STATE_NAME, {"config": self.config, **self.state})

    def record_epoch(self, model: Any, stage: int, epoch: int, logs: dict, seconds: float) -> bool:
        """Record one finished epoch, save checkpoints and state; True when early stopping says stop."""
        stage_state = self.stage_state(stage)
        entry = {
            "global_epoch": self.global_epochs() + 1,
            "stage": stage,
            "epoch": epoch,
            **{k: float(logs[k]) for k in ("loss", "accuracy", "val_loss", "val_accuracy")},
            "learning_rate": stage_state["learning_rate"],
            "seconds": seconds,
        }
        self.state["history"].append(entry)
        stage_state["epochs_run"] = epoch
        stage_state["seconds"] += seconds
        self.state["seconds"] += seconds

        notes = []
        best = self.state.get("best")
        # On a small val split accuracy ties are common; the lower val loss breaks them.
        is_best = best is None or (entry["val_accuracy"], -entry["val_loss"]) > (
            best["val_accuracy"], -best["val_loss"]
        )
        if is_best:
            best_name = f"best-e{entry['global_epoch']:04d}.keras"
            save_model_atomically(model, self.checkpoints / best_name)
            self.state["best"] = {k: entry[k] for k in ("global_epoch", "stage", "epoch", "val_accuracy", "val_loss")}
            self.state["best"]["file"] = best_name
            notes.append("best so far")

        # Early stopping watches val loss, which keeps moving after accuracy saturates on a small val set.
        stop = False
        patience = self.config["patience"]
        if stage_state["best_val_loss"] is None or entry["val_loss"] < stage_state["best_val_loss"]:
            stage_state["best_val_loss"], stage_state["wait"] = entry["val_loss"], 0
        else:
            stage_state["wait"] += 1
            if patience and stage_state["wait"] >= patience:
                stage_state["stopped_early"] = stop = True
                notes.append(f"no val loss improvement for {patience} epochs, stopping stage {stage}")

        # Checkpoints get fresh names, and the state points at them only once they are complete,
        # so a kill at any moment leaves a state naming whole checkpoints of the epochs it records.
        if is_best:
            last_name = best_name  # the same model and optimizer state: one file serves both
        else:
            last_name = f"last-e{entry['global_epoch']:04d}.keras"
            save_model_atomically(model, self.checkpoints / last_name)
        self.state["last_checkpoint"] = last_name
        self.write_history()
        self.save_state()
        self.remove_stale_checkpoints()

        planned = self.config[f"epochs{stage}"]
        self.log(
            f"stage {stage} epoch {epoch}/{planned}: loss {entry['loss']:.4f} acc {entry['accuracy']:.3f}  "
            f"val loss {entry['val_loss']:.4f} val acc {entry['val_accuracy']:.3f}  {seconds:.1f} s"
            + (f"  ({'; '.join(notes)})" if notes else "")
        )
        return stop

    def write_history(self) -> None:
        history = self.state["history"]
        write_json(self.out / "history.json", {"stage2_starts_at": self.stage2_start(), "epochs": history})
        write_csv(self.out / "history.csv", HISTORY_FIELDS, [[e[k] for k in HISTORY_FIELDS] for e in history])

    def stage2_start(self) -> int | None:
        return next((e["global_epoch"] for e in self.state["history"] if e["stage"] == 2), None)


def _new_state() -> dict:
    stage = {
        "epochs_run": 0, "stopped_early": False, "seconds": 0.0, "trainable_params": None,
        "non_trainable_params": None, "learning_rate": None, "best_val_loss": None, "wait": 0,
    }
    return {
        "format": RUN_FORMAT + "-state", "history": [], "best": None, "seconds": 0.0, "finished": False,
        "last_checkpoint": None, "stages": {"1": dict(stage), "2": dict(stage)}, "skipped": {},
    }


def open_run(out: Path | None, resume: bool, config: dict, scan: DatasetScan, log: Log) -> Run:
    """The run to write: a new, empty folder, or with `resume` an unfinished run of the same settings."""
    if out is None:
        k = config["unfreeze_top"]
        prefix = f"{scan.name}-{config['backbone']}-{'all' if k == 'all' else f'top{k}'}-"
        out = _find_resumable(prefix) if resume else RUNS_DIR / f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TlfeatError(f"{out}: exists and is not a folder; `out` needs a run folder")
    if not resume:
        if out.exists() and any(out.iterdir()):
            what = "holds a fine-tune run" if (out / STATE_NAME).exists() else "is not empty"
            raise TlfeatError(f"{out}: {what}; pass `resume` to continue it, or choose another `out`")
        return Run(out, config, _new_state(), log)

    if not (out / STATE_NAME).is_file():
        raise TlfeatError(f"{out}: not a fine-tune run to resume (no {STATE_NAME})")
    saved = read_json_object(out / STATE_NAME)
    if saved.get("format") != RUN_FORMAT + "-state" or not isinstance(saved.get("config"), dict):
        raise TlfeatError(f"{out / STATE_NAME}: not a tlfeat fine-tune state file")
    old = saved.pop("config")
    # The dataset may have moved: its fingerprint (images, classes, splits) is what must match.
    differs = [
        f"{k} {_short(config[k])} vs {_short(old.get(k))}"
        for k in config
        if k not in RESUMABLE_CHANGES and k != "dataset_root" and config[k] != old.get(k)
    ]
    if differs:
        raise TlfeatError(
            f"{out}: was started with other settings ({'; '.join(differs)} [now vs run]); "
            "resume with the original options or start a new `out`"
        )
    return Run(out, config, saved, log)


def _short(value: Any, limit: int = 24) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _find_resumable(prefix: str) -> Path:
    """The newest unfinished run named runs/<prefix>*."""
    candidates = [
        p for p in sorted(RUNS_DIR.glob(prefix + "*"))
        if (p / STATE_NAME).is_file() and not read_json_object(p / STATE_NAME).get("finished")
    ]
    if not candidates:
        raise TlfeatError(f"`resume`: no unfinished run {RUNS_DIR / prefix}* to continue; pass `out=RUN_DIR`")
    return candidates[-1]
