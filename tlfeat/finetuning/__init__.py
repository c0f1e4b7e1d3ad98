"""Fine-tuning: model (`model`), data (`data`), run state and resume (`state`), training (`train`), reading
finished runs back (`runs`). Keras is imported only when a model is built or loaded, so reading run summaries
(`tlfeat.apps.compare`) never pays for it."""

from tlfeat.finetuning.runs import MODEL_NAME, RUN_FORMAT, SUMMARY_NAME, load_finetuned, predict_files, read_run_summary
from tlfeat.finetuning.train import FinetuneSummary, finetune

__all__ = ["MODEL_NAME", "RUN_FORMAT", "SUMMARY_NAME", "FinetuneSummary", "finetune", "load_finetuned",
           "predict_files", "read_run_summary"]
