"""The recipes `tlfeat recipe` runs: which (backbone, input size, test-time augmentation) extractions to fuse.

Kept apart from the runner (`tlfeat.apps.recipe`) so that the CLI lists them without importing scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass

from tlfeat.backbones.preprocessing import NO_TTA
from tlfeat.errors import TlfeatError

DEFAULT_RECIPE = "best"


@dataclass(frozen=True)
class Member:
    """One extraction of a recipe."""

    backbone: str
    image_size: int
    tta: str = NO_TTA

    @classmethod
    def parse(cls, text: str) -> "Member":
        """BACKBONE:SIZE[:TTA], e.g. efficientnet_lite1:300:flip."""
        parts = text.split(":")
        if len(parts) not in (2, 3) or not parts[1].isdigit():
            raise TlfeatError(f"{text!r}: expected BACKBONE:SIZE or BACKBONE:SIZE:TTA, e.g. efficientnet_lite1:300:flip")
        return cls(parts[0], int(parts[1]), parts[2] if len(parts) == 3 else NO_TTA)

    @property
    def label(self) -> str:
        return f"{self.backbone}@{self.image_size}" + ("" if self.tta == NO_TTA else f"+{self.tta}")


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    members: tuple[Member, ...]
    c_grid: tuple[float, ...]  # logistic regression C values cross-validated; ties go to the earlier one


def _lite(n: int, size: int, tta: str = NO_TTA) -> Member:
    return Member(f"efficientnet_lite{n}", size, tta)


# Members as measured on Scene15 (BENCHMARKS.md, "Offline recipes"): larger inputs help more than
# larger models, and the three Lite models at enlarged inputs beat all six extractions fused.
RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "fast",
            "EfficientNet-Lite0 at 224 px: the cheapest offline features",
            (_lite(0, 224),),
            (0.01, 0.03, 0.1, 0.3, 1.0),
        ),
        Recipe(
            "best",
            "EfficientNet-Lite0 at 288 px, Lite1 at 300 px, Lite2 at 320 px, fused (offline weights)",
            (_lite(0, 288), _lite(1, 300), _lite(2, 320)),
            (0.01, 0.03, 0.1, 0.3, 1.0),
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise TlfeatError(f"`recipe={name!r}`: unknown; choose one of {', '.join(RECIPES)}") from None
