"""Test-time augmentation at extraction (--tta flip): its cache key, its features, and heads fitted on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import TRAINABLE_SEED, make_dataset, run_cli
from tlfeat import cache
from tlfeat.backbones import get_backbone
from tlfeat.apps.predict import embed_for_head
from tlfeat.data.decode import decode_image
from tlfeat.errors import TlfeatError
from tlfeat.extraction.run import default_output, extract
from tlfeat.heads.fit import fit_heads, load_features
from tlfeat.heads.store import load_head
from tlfeat.runtime import FeatureExtractor

SIZE = 32
# Random VGG16 features are of order one (random Lite0's vanish to ~1e-12, too small to compare).
SETTINGS = dict(backbone="vgg16", weights="none", image_size=SIZE, seed=TRAINABLE_SEED, progress=False)


@pytest.fixture(scope="module")
def flipped(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tta")
    data = make_dataset(root / "data", n_classes=3, per_class=8)
    plain = extract(data, out=root / "plain.h5", **SETTINGS).out
    flip = extract(data, out=root / "flip.h5", tta="flip", **SETTINGS).out
    return {"root": root, "data": data, "plain": plain, "flip": flip}


def test_flip_features_are_the_mean_of_the_image_and_its_mirror(flipped: dict) -> None:
    spec = get_backbone("vgg16")
    rows = cache.load(flipped["flip"])
    pixels = np.stack([decode_image(flipped["data"] / p, SIZE) for p in rows.paths])  # uint8, as extract feeds it
    one_pass = FeatureExtractor(spec, "none", SIZE, batch_size=len(pixels))
    plain = one_pass(pixels)
    mirrored = one_pass(np.ascontiguousarray(pixels[:, :, ::-1]))

    scale = np.abs(plain).max()
    assert scale > 0 and np.abs(plain - mirrored).max() > 0.01 * scale  # the generated images are not symmetric
    np.testing.assert_allclose(rows.features, (plain + mirrored) / 2, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(cache.load(flipped["plain"]).features, plain, rtol=1e-4, atol=1e-5 * scale)


def test_tta_is_part_of_the_cache_key(flipped: dict, tmp_path: Path) -> None:
    assert cache.read_key(flipped["flip"]).tta == "flip"
    assert cache.read_key(flipped["plain"]).tta == "none"
    assert cache.read_key(flipped["plain"]) != cache.read_key(flipped["flip"])

    with pytest.raises(TlfeatError, match=r"plain\.h5: cache was made with other settings \(tta 'flip' vs 'none'"):
        extract(flipped["data"], out=flipped["plain"], tta="flip", **SETTINGS)
    copy = tmp_path / "copy.h5"
    copy.write_bytes(Path(flipped["plain"]).read_bytes())
    extract(flipped["data"], out=copy, tta="flip", overwrite=True, **SETTINGS)
    assert cache.read_key(copy).tta == "flip"

    # Default files differ too, so a flip run never meets a plain cache.
    names = {default_output(flipped["data"], "efficientnet_lite0", size, tta).name
             for size in (224, 288) for tta in ("none", "flip")}
    assert names == {"data-efficientnet_lite0.h5", "data-efficientnet_lite0-flip.h5",
                     "data-efficientnet_lite0-288.h5", "data-efficientnet_lite0-288-flip.h5"}


def test_cache_without_tta_attribute_reads_as_none(flipped: dict, tmp_path: Path) -> None:
    """Caches written before --tta existed stay valid: same key as a plain run today, nothing recomputed."""
    import h5py

    old = tmp_path / "old.h5"
    old.write_bytes(Path(flipped["plain"]).read_bytes())
    with h5py.File(old, "a") as handle:
        del handle.attrs["tta"]
    assert cache.read_key(old).tta == "none"
    summary = extract(flipped["data"], out=old, **SETTINGS)
    assert summary.n_computed == 0


def test_a_head_on_flip_features_embeds_new_images_with_flip(flipped: dict) -> None:
    head = fit_heads([flipped["flip"]], head="logreg", out=flipped["root"] / "head").results[0].files["model"]
    estimator, meta = load_head(head)
    assert meta["sources"][0]["tta"] == "flip"
    rows = load_features([flipped["flip"]]).data
    files = [flipped["data"] / p for p in rows.paths]
    features, ok, failures = embed_for_head(head, meta, files)
    assert ok == list(range(len(files))) and not failures
    np.testing.assert_allclose(features, rows.features, rtol=1e-4, atol=1e-5 * np.abs(rows.features).max())

    # evaluate refuses plain features for it, naming the setting
    result = run_cli("evaluate", str(head), str(flipped["plain"]), timeout=300)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "tta 'none', but logreg.skops was fitted on tta 'flip'" in result.stderr


def test_cli_rejects_an_unknown_tta(flipped: dict, tmp_path: Path) -> None:
    result = run_cli("extract", str(flipped["data"]), "--tta", "rotate", "--weights", "none", "-q",
                     "--out", str(tmp_path / "x.h5"), timeout=300)
    assert result.returncode == 1 and result.stderr.strip() == "error: --tta rotate: use none or flip"
    with pytest.raises(TlfeatError, match=r"^`tta='rotate'`: use none or flip$"):
        extract(flipped["data"], out=tmp_path / "x.h5", tta="rotate", **SETTINGS)
