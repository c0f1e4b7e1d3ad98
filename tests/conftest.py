"""Shared fixtures: generated image folders, the Scene15 location, an isolated TLFEAT_HOME."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCENE15 = (REPO / ".." / "shared" / "data" / "scene15").resolve()

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Converted weights go to one folder per test session, never the user's ~/.cache. Set at
# import, before any session- or module-scoped fixture can build a model; child
# processes inherit it.
os.environ["TLFEAT_HOME"] = tempfile.mkdtemp(prefix="tlfeat-test-home-")


def child_env() -> dict[str, str]:
    """The environment of a tlfeat child process: quiet TensorFlow, and this checkout's tlfeat whether
    installed or not (a child script may live in a temp folder; the editable install may point elsewhere)."""
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python cli.py ARGS` in a child process, output captured as text."""
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=child_env())


def make_image(path: Path, class_index: int, variant: int, size: tuple[int, int] = (48, 40)) -> None:
    """A small RGB picture whose colour and stripes depend on the class, texture on the variant."""
    rng = np.random.default_rng(1000 * class_index + variant)
    height, width = size[1], size[0]
    base = np.array([(class_index * 97) % 256, (class_index * 57 + 80) % 256, (class_index * 31 + 160) % 256])
    pixels = np.tile(base, (height, width, 1)).astype(np.float32)
    pixels[:, :: 2 + class_index % 4] *= 0.5
    pixels += rng.normal(0, 12, pixels.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def make_dataset(root: Path, n_classes: int = 3, per_class: int = 8, ext: str = "png") -> Path:
    for c in range(n_classes):
        for v in range(per_class):
            make_image(root / f"class_{c}" / f"img_{v:03d}.{ext}", c, v)
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "tiny")


@pytest.fixture(scope="session")
def scene15() -> Path:
    if not (SCENE15 / "train").is_dir():
        pytest.skip(f"Scene15 not found at {SCENE15} (the shared data folder beside the repo)")
    return SCENE15


@pytest.fixture(scope="session")
def scene15_subset(scene15: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small flat dataset of 12 real Scene15 images, copied to a temp folder (shared data stays untouched)."""
    root = tmp_path_factory.mktemp("scene15-subset")
    for class_dir in sorted((scene15 / "train").iterdir())[:3]:
        for image in sorted(class_dir.iterdir())[:4]:
            (root / class_dir.name).mkdir(exist_ok=True)
            (root / class_dir.name / image.name).write_bytes(image.read_bytes())
    return root
