"""tlfeat: transfer learning with cached ImageNet CNN embeddings.

The Python API, for notebooks and scripts (each name is the function the CLI command of the same name calls)::

    import tlfeat

    summary = tlfeat.extract("data/scenes")                 # -> ExtractSummary; cache/scenes-efficientnet_lite0.h5
    data = tlfeat.load(summary.out, split="train")          # -> CacheData: features, labels, paths, class_names
    fitted = tlfeat.fit_heads([summary.out], head="all")    # -> FitSummary: per-head scores, files written
    result = tlfeat.predict(fitted.out / "logreg.skops", ["photo.jpg"])
    report = tlfeat.audit(summary.out)                      # -> AuditResult: duplicate pairs, label issues, files
    tlfeat.export(summary.out, format="parquet", out="exports/scenes")  # Parquet for pandas, DuckDB, Ray Data

Importing tlfeat (and calling `tlfeat.load`) imports neither Keras nor TensorFlow: every name below is
resolved on first use, so a notebook pays only for what it calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tlfeat import quiet_import
from tlfeat.lazy import lazy_attributes

__version__ = "0.1.0"

# TensorFlow's C++ start-up banner (oneDNN, CPU features, absl) is filtered out of stderr when it is imported.
quiet_import.install()

# public name -> (module, attribute)
_API: dict[str, tuple[str, str]] = {
    "extract": ("tlfeat.extraction.run", "extract"),
    "load": ("tlfeat.cache", "load"),
    "fit_heads": ("tlfeat.heads.fit", "fit_heads"),
    "finetune": ("tlfeat.finetuning.train", "finetune"),
    "predict": ("tlfeat.apps.predict", "predict_images"),
    "evaluate": ("tlfeat.apps.evaluate", "evaluate_on_caches"),
    "compare": ("tlfeat.apps.compare", "compare"),
    "recipe": ("tlfeat.apps.recipe", "run_recipe"),
    "export": ("tlfeat.apps.export", "export"),
    "doctor": ("tlfeat.apps.doctor", "doctor"),
    "list_backbones": ("tlfeat.backbones.registry", "list_backbones"),
    "list_heads": ("tlfeat.heads.registry", "list_heads"),
    "load_head": ("tlfeat.heads.store", "load_head"),
    "audit": ("tlfeat.analysis.audit", "audit"),
    "similar": ("tlfeat.analysis.similar", "similar"),
    "embedding_map": ("tlfeat.analysis.maps", "embedding_map"),
    "demo": ("tlfeat.apps.demo", "run_demo"),
    "TlfeatError": ("tlfeat.errors", "TlfeatError"),
    "Interrupted": ("tlfeat.errors", "Interrupted"),
    # what the functions return, for annotations and isinstance
    "ExtractSummary": ("tlfeat.extraction.run", "ExtractSummary"),
    "CacheData": ("tlfeat.cache", "CacheData"),
    "FitSummary": ("tlfeat.heads.folder", "FitSummary"),
    "HeadResult": ("tlfeat.heads.folder", "HeadResult"),
    "PredictResult": ("tlfeat.apps.predict", "PredictResult"),
    "Prediction": ("tlfeat.apps.predict", "Prediction"),
    "Evaluation": ("tlfeat.apps.evaluate", "Evaluation"),
    "FinetuneSummary": ("tlfeat.finetuning.train", "FinetuneSummary"),
    "CompareResult": ("tlfeat.apps.compare", "CompareResult"),
    "AuditResult": ("tlfeat.analysis.audit", "AuditResult"),
    "SimilarResult": ("tlfeat.analysis.similar", "SimilarResult"),
    "MapResult": ("tlfeat.analysis.maps", "MapResult"),
    "ExportSummary": ("tlfeat.apps.export", "ExportSummary"),
    "RecipeResult": ("tlfeat.apps.recipe", "RecipeResult"),
    "DemoResult": ("tlfeat.apps.demo", "DemoResult"),
}

__all__ = sorted(_API)

if TYPE_CHECKING:  # what static tools and IDEs see; at run time `__getattr__` imports on first use
    from tlfeat.analysis.audit import AuditResult, audit
    from tlfeat.analysis.maps import MapResult, embedding_map
    from tlfeat.analysis.similar import SimilarResult, similar
    from tlfeat.apps.compare import CompareResult, compare
    from tlfeat.apps.demo import DemoResult
    from tlfeat.apps.demo import run_demo as demo
    from tlfeat.apps.doctor import doctor
    from tlfeat.apps.evaluate import Evaluation
    from tlfeat.apps.evaluate import evaluate_on_caches as evaluate
    from tlfeat.apps.export import ExportSummary, export
    from tlfeat.apps.predict import Prediction, PredictResult
    from tlfeat.apps.predict import predict_images as predict
    from tlfeat.apps.recipe import RecipeResult
    from tlfeat.apps.recipe import run_recipe as recipe
    from tlfeat.backbones.registry import list_backbones
    from tlfeat.cache import CacheData, load
    from tlfeat.errors import Interrupted, TlfeatError
    from tlfeat.extraction.run import ExtractSummary, extract
    from tlfeat.finetuning.train import FinetuneSummary, finetune
    from tlfeat.heads.fit import fit_heads
    from tlfeat.heads.folder import FitSummary, HeadResult
    from tlfeat.heads.registry import list_heads
    from tlfeat.heads.store import load_head


__getattr__, __dir__ = lazy_attributes(__name__, _API)
