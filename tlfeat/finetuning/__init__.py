"""Fine-tuning: model (`model`), data (`data`), run state and resume (`state`), training (`train`), reading
finished runs back (`runs`), the options' defaults (`options`). Keras is imported only when a model is built or
loaded, so reading run summaries (`tlfeat.apps.compare`) never pays for it; each name below is imported on first
use, so the CLI reads `options` for its help without importing scikit-learn.
"""

from typing import TYPE_CHECKING

from tlfeat.lazy import lazy_attributes

_EXPORTS = {
    **{name: ("tlfeat.finetuning.runs", name) for name in (
        "MODEL_NAME", "RUN_FORMAT", "SUMMARY_NAME", "load_finetuned", "predict_files", "read_run_summary")},
    **{name: ("tlfeat.finetuning.train", name) for name in ("FinetuneSummary", "finetune")},
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from tlfeat.finetuning.runs import (
        MODEL_NAME, RUN_FORMAT, SUMMARY_NAME, load_finetuned, predict_files, read_run_summary,
    )
    from tlfeat.finetuning.train import FinetuneSummary, finetune

__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
