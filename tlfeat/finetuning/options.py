"""What an option of `finetune` left out means in a new run (`resume` continues with the run's own instead).

Apart from the training code so that the CLI's help reads it without importing scikit-learn or Keras.
"""

from __future__ import annotations

from typing import Any

from tlfeat.backbones.registry import DEFAULT_BACKBONE
from tlfeat.data.scan import DEFAULT_RATIOS

DEFAULT_OPTIONS: dict[str, Any] = {
    "backbone": DEFAULT_BACKBONE, "weights": "imagenet", "epochs1": 20, "epochs2": 30, "lr1": 1e-3, "lr2": 1e-5,
    "batch_size": 32, "augment": False, "seed": 0, "ratios": DEFAULT_RATIOS, "patience": 10,
}
