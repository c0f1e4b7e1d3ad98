"""A fine-tune run folder: its config and state as typed records, and the bookkeeping after every epoch.

``state.json`` holds the config (`RunConfig`) and the state (`RunState`: history,
best epoch, per-stage progress, skipped files), both plain JSON a person can read.
While running, ``checkpoints/`` holds the best epoch so far and the latest one
(model and optimizer, ``.keras``) and the state names them; all are replaced
atomically after every epoch, so ``--resume`` after Ctrl-C or a kill continues
from the last finished epoch. A finished run keeps no checkpoints, so it cannot
be extended: `open_run` refuses larger epoch counts for it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from tlfeat.data.scan import DatasetScan
from tlfeat.errors import TlfeatError
from tlfeat.fileio import check_output_path, check_outside_dataset, read_json_object, temporary_name
from tlfeat.finetuning.model import save_model_atomically
from tlfeat.finetuning.runs import RUNS_DIR, STATE_FORMAT, STATE_NAME, run_lock
from tlfeat.reports import write_csv, write_json

# Settings that may differ on resume of an unfinished run (to extend it); everything else must match.
RESUMABLE_CHANGES = ("epochs1", "epochs2", "patience")

Log = Callable[[str], None]


@dataclass
class RunConfig:
    """What a run was started with; `base_layers` is known once the model is built."""

    backbone: str
    weights: str  # "imagenet", "none" or a resolved weights file
    weights_identity: str
    preprocessing: str
    image_size: int
    unfreeze_top: int | str  # layers of the base stage 2 trains, or "all"
    epochs1: int
    epochs2: int
    lr1: float
    lr2: float
    batch_size: int
    augment: bool
    patience: int
    seed: int
    split_ratios: list[float]
    dataset_root: str
    dataset_fingerprint: str
    classes: list[str]
    base_layers: int | None = None
    keras_backend: str | None = None  # None in a run from before it was recorded

    def epochs(self, stage: int) -> int:
        return self.epochs1 if stage == 1 else self.epochs2

    def method(self) -> str:
        k = self.unfreeze_top
        if self.epochs2 == 0 or k == 0:
            return "head on frozen base"
        return "fine-tuned, whole base" if k == "all" or k == self.base_layers else f"fine-tuned, top {k} layers"


@dataclass
class EpochRecord:
    """One finished epoch, as history.csv and history.json list it."""

    global_epoch: int
    stage: int
    epoch: int
    loss: float
    accuracy: float
    val_loss: float
    val_accuracy: float
    learning_rate: float
    seconds: float


@dataclass
class BestEpoch:
    """The best epoch so far (by val accuracy, then val loss) and its checkpoint file."""

    global_epoch: int
    stage: int
    epoch: int
    val_accuracy: float
    val_loss: float
    file: str


@dataclass
class StageState:
    epochs_run: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    trainable_params: int | None = None
    non_trainable_params: int | None = None
    learning_rate: float | None = None
    best_val_loss: float | None = None  # early stopping watches val loss
    wait: int = 0  # epochs since it last improved


@dataclass
class RunState:
    history: list[EpochRecord] = field(default_factory=list)
    best: BestEpoch | None = None
    seconds: float = 0.0
    finished: bool = False
    last_checkpoint: str | None = None
    stages: dict[int, StageState] = field(default_factory=lambda: {1: StageState(), 2: StageState()})
    skipped: dict[str, str] = field(default_factory=dict)  # relative path -> why it could not be decoded

    def to_json(self, config: RunConfig) -> dict:
        return {
            "format": STATE_FORMAT, "config": asdict(config),
            **{f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("history", "best", "stages")},
            "history": [asdict(e) for e in self.history],
            "best": asdict(self.best) if self.best else None,
            "stages": {str(k): asdict(v) for k, v in self.stages.items()},
        }

    @classmethod
    def from_json(cls, document: dict) -> "RunState":
        return cls(
            history=[EpochRecord(**e) for e in document["history"]],
            best=BestEpoch(**document["best"]) if document.get("best") else None,
            seconds=float(document["seconds"]),
            finished=bool(document["finished"]),
            last_checkpoint=document.get("last_checkpoint"),
            stages={int(k): StageState(**v) for k, v in document["stages"].items()},
            skipped=dict(document.get("skipped") or {}),
        )


class Run:
    """One run folder: its config, state and files."""

    def __init__(self, out: Path, config: RunConfig, state: RunState, log: Log) -> None:
        self.out = out
        self.config = config
        self.state = state
        self.log = log
        self.failures: dict[str, str] = dict(state.skipped)
        self._failure_lock = threading.Lock()

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    def last_checkpoint(self) -> Path | None:
        name = self.state.last_checkpoint
        return self.checkpoints / name if name else None

    def remove_stale_checkpoints(self) -> None:
        """Delete checkpoint files the state no longer names (older epochs, or left by a kill)."""
        keep = {self.state.last_checkpoint, self.state.best.file if self.state.best else None}
        for path in self.checkpoints.glob("*.keras"):
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def remove_stale_temporaries(self) -> None:
        """Delete half-written files a killed run left in the folder (call holding its lock: no live writer's)."""
        for leftover in self.out.glob(temporary_name(Path("*"), pid="*")):
            leftover.unlink(missing_ok=True)

    def global_epochs(self) -> int:
        return len(self.state.history)

    def stage_state(self, stage: int) -> StageState:
        return self.state.stages[stage]

    def note_failure(self, path: Path, reason: str) -> None:
        relpath = Path(path).relative_to(self.config.dataset_root).as_posix()
        with self._failure_lock:
            if relpath in self.failures:
                return
            self.failures[relpath] = reason
        self.log(f"  skipped {relpath}: {reason}")

    def save_state(self) -> None:
        with self._failure_lock:  # decoding threads may be adding failures right now
            self.state.skipped = dict(self.failures)
        write_json(self.out / STATE_NAME, self.state.to_json(self.config))

    def record_epoch(self, model: Any, stage: int, epoch: int, logs: dict, seconds: float) -> bool:
        """Record one finished epoch, save checkpoints and state; True when early stopping says stop."""
        stage_state = self.stage_state(stage)
        entry = EpochRecord(
            global_epoch=self.global_epochs() + 1, stage=stage, epoch=epoch,
            **{k: float(logs[k]) for k in ("loss", "accuracy", "val_loss", "val_accuracy")},
            learning_rate=stage_state.learning_rate, seconds=seconds,
        )
        self.state.history.append(entry)
        stage_state.epochs_run = epoch
        stage_state.seconds += seconds
        self.state.seconds += seconds

        notes = []
        best = self.state.best
        # On a small val split accuracy ties are common; the lower val loss breaks them.
        is_best = best is None or (entry.val_accuracy, -entry.val_loss) > (best.val_accuracy, -best.val_loss)
        if is_best:
            best_name = f"best-e{entry.global_epoch:04d}.keras"
            save_model_atomically(model, self.checkpoints / best_name)
            self.state.best = BestEpoch(
                entry.global_epoch, entry.stage, entry.epoch, entry.val_accuracy, entry.val_loss, best_name
            )
            notes.append("best so far")

        # Early stopping watches val loss, which keeps moving after accuracy saturates on a small val set.
        stop = False
        patience = self.config.patience
        if stage_state.best_val_loss is None or entry.val_loss < stage_state.best_val_loss:
            stage_state.best_val_loss, stage_state.wait = entry.val_loss, 0
        else:
            stage_state.wait += 1
            if patience and stage_state.wait >= patience:
                stage_state.stopped_early = stop = True
                notes.append(f"no val loss improvement for {patience} epochs, stopping stage {stage}")

        # Checkpoints get fresh names, and the state points at them only once they are complete,
        # so a kill at any moment leaves a state naming whole checkpoints of the epochs it records.
        if is_best:
            last_name = best_name  # the same model and optimizer state: one file serves both
        else:
            last_name = f"last-e{entry.global_epoch:04d}.keras"
            save_model_atomically(model, self.checkpoints / last_name)
        self.state.last_checkpoint = last_name
        self.write_history()
        self.save_state()
        self.remove_stale_checkpoints()

        self.log(
            f"stage {stage} epoch {epoch}/{self.config.epochs(stage)}: loss {entry.loss:.4f} acc {entry.accuracy:.3f}  "
            f"val loss {entry.val_loss:.4f} val acc {entry.val_accuracy:.3f}  {seconds:.1f} s"
            + (f"  ({'; '.join(notes)})" if notes else "")
        )
        return stop

    def write_history(self) -> None:
        history = [asdict(e) for e in self.state.history]
        names = [f.name for f in fields(EpochRecord)]
        write_json(self.out / "history.json", {"stage2_starts_at": self.stage2_start(), "epochs": history})
        write_csv(self.out / "history.csv", names, [[e[k] for k in names] for e in history])

    def stage2_start(self) -> int | None:
        return next((e.global_epoch for e in self.state.history if e.stage == 2), None)


def run_prefix(dataset: str, backbone: str, unfreeze_top: int | str) -> str:
    """How default run folders are named: runs/<prefix><timestamp>."""
    return f"{dataset}-{backbone}-{'all' if unfreeze_top == 'all' else f'top{unfreeze_top}'}-"


def _read_state(out: Path) -> tuple[RunConfig, RunState]:
    saved = read_json_object(out / STATE_NAME)
    try:
        if saved.get("format") != STATE_FORMAT:
            raise TypeError
        return RunConfig(**saved["config"]), RunState.from_json(saved)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise TlfeatError(f"{out / STATE_NAME}: not a tlfeat fine-tune state file") from None


def recorded_options(out: Path) -> dict[str, Any]:
    """The options the run in `out` was started with, named as `finetune` takes them ({} where `out` holds no
    run): what `resume` continues with, unless given again."""
    if not (out / STATE_NAME).is_file():
        return {}
    config, _ = _read_state(out)
    options = {name: getattr(config, name) for name in (
        "backbone", "weights", "epochs1", "epochs2", "lr1", "lr2", "batch_size", "augment", "patience", "seed",
        "image_size", "unfreeze_top")}
    return {**options, "ratios": tuple(config.split_ratios)}


def open_run(out: Path | None, resume: bool, config: RunConfig, scan: DatasetScan, log: Log) -> Run:
    """The run to write: a new, empty folder (`out`, default a new one in runs/), or with `resume` the run in
    `out` (the caller finds it: `find_resumable`) if it has the same settings.

    An unfinished run may be resumed with other `RESUMABLE_CHANGES` (to extend it), but not with fewer epochs in
    a stage than it has run, nor with more stage-1 epochs once stage 2 has begun; a finished one kept no
    checkpoints to continue from, so any such change is refused.
    """
    if out is None:
        prefix = run_prefix(scan.name, config.backbone, config.unfreeze_top)
        out = RUNS_DIR / f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    check_outside_dataset(out, scan.root)
    check_output_path(out, folder=True)
    if not resume:
        lock_file = run_lock(out).path  # a live run's (refused with its holder named) or a killed one's
        if out.exists() and any(path != lock_file for path in out.iterdir()):
            with run_lock(out):  # a run still writing it: "wait for it" (its holder named), not "pass `resume`"
                pass
            what = "holds a fine-tune run" if (out / STATE_NAME).exists() else "is not empty"
            raise TlfeatError(f"{out}: {what}; pass `resume` to continue it, or choose another `out`")
        return Run(out, config, RunState(), log)

    if not (out / STATE_NAME).is_file():
        raise TlfeatError(f"{out}: not a fine-tune run to resume (no {STATE_NAME})")
    old, state = _read_state(out)
    new, before = asdict(config), asdict(old)
    # The dataset may have moved: its fingerprint (images, classes, splits) is what must match.
    differs = [
        k for k in new
        if k not in (*RESUMABLE_CHANGES, "dataset_root", "base_layers") and new[k] != before[k]
        and not (k == "keras_backend" and before[k] is None)
    ]
    if differs == ["dataset_fingerprint"]:  # the same options: the folder's files changed, no option undoes that
        raise TlfeatError(
            f"{out}: the images of {scan.root} are not those this run started on (files added, removed or "
            "renamed, or moved between classes or splits); restore them, or start a new `out`"
        )
    if differs:
        backend = f" under KERAS_BACKEND={before['keras_backend']}" if new["keras_backend"] != before["keras_backend"] \
            and before["keras_backend"] else ""
        settings = "; ".join(f"{k} {_short(new[k])} vs {_short(before[k])}" for k in differs)
        raise TlfeatError(
            f"{out}: was started with other settings ({settings} [now vs run]); "
            f"resume with the run's own (leave those options out){backend} or start a new `out`"
        )
    if state.finished:
        extended = [f"{k}={new[k]!r}" for k in RESUMABLE_CHANGES if new[k] != before[k]]
        if extended:
            ran = ", ".join(f"{k}={before[k]!r}" for k in RESUMABLE_CHANGES)
            raise TlfeatError(
                f"`{'` `'.join(extended)}`: {out} finished with {ran} and kept no checkpoints to continue from; "
                "start a new run (another `out`) for another schedule"
            )
        config = old
    for stage in (1, 2):
        name, ran = f"epochs{stage}", state.stages[stage].epochs_run
        if new[name] < ran:  # those epochs cannot be undone: the run would mix them with the shorter schedule
            raise TlfeatError(
                f"`{name}={new[name]!r}`: {out} has already run {ran} epochs of stage {stage}; resume with "
                f"`{name}` of at least {ran}, or start a new run (another `out`)"
            )
    stage1, ran = state.stages[1], state.stages[1].epochs_run
    if state.stages[2].epochs_run and not stage1.stopped_early and new["epochs1"] > ran:
        # Stage 2 has changed the model: more stage-1 epochs would train its unfrozen layers at its learning rate.
        raise TlfeatError(
            f"`epochs1={new['epochs1']!r}`: {out} has begun stage 2, so stage 1 (its {ran} epochs) cannot be "
            f"extended; resume with `epochs1={ran}`, or start a new run (another `out`)"
        )
    changed = [f"{k}={new[k]!r} (was {before[k]!r})" for k in RESUMABLE_CHANGES if new[k] != before[k]]
    if changed:
        # A stage that stopped early stays stopped (its best epoch may already have seeded stage 2).
        stopped = " and ".join(f"stage {s}" for s in (1, 2) if state.stages[s].stopped_early)
        kept = f" ({stopped} stopped early: that stays)" if stopped and new["patience"] != before["patience"] else ""
        log(f"{out}: continuing with {', '.join(changed)}{kept}")
    config.base_layers = old.base_layers
    return Run(out, config, state, log)


def _short(value: Any, limit: int = 24) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def find_resumable(prefix: str) -> Path:
    """The newest unfinished run named runs/<prefix>*: what `resume` continues when no `out` is given."""
    candidates = [
        p for p in sorted(RUNS_DIR.glob(prefix + "*"))
        if (p / STATE_NAME).is_file() and not read_json_object(p / STATE_NAME).get("finished")
    ]
    if not candidates:
        raise TlfeatError(f"`resume`: no unfinished run {RUNS_DIR / prefix}* to continue; pass `out=RUN_DIR`")
    return candidates[-1]
