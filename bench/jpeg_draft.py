"""What JPEG DCT scaling (Pillow's draft) changes: pixels, pretrained features and decoding time.

Usage:
    python bench/jpeg_draft.py [--photos 200] [--scene15-upscaled 200] [--json OUT]

Two sets of large JPEGs (quality 90): `--photos` generated 1024x768 colour
photos (bench/photos.py), and `--scene15-upscaled` Scene15 test images blown up
4x (bicubic), real scenes at camera-like sizes. Each file is decoded to 224x224
two ways: full size then the bilinear resize (tlfeat before, and plain Pillow),
and tlfeat's `decode_into`, which lets libjpeg decode at 1/2 scale first (both
sides are >= 2x 224, so it may). Reported: the mean absolute pixel difference
(0-255), the relative L2 distance and cosine similarity between the
EfficientNet-Lite0 ImageNet features (offline weights, float32 CPU) of the two
decodings, and single-thread decoding speed (median of 3 passes, both sides in
turn, files in the page cache). For scale, the same feature distances between
the lossless picture (PNG) and its quality-90 JPEG, both decoded at full size:
what JPEG compression itself changes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tlfeat, run from anywhere

from isolated import bench_command, finish_report  # noqa: E402
from photos import make_photos  # noqa: E402

SCENE15 = Path(os.environ.get("TLFEAT_SCENE15") or Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "scene15")
SIZE = 224


def full_scale(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))


def upscaled_scene15(folder: Path, count: int) -> tuple[list[Path], list[Path]]:
    """(JPEG, PNG) copies of `count` Scene15 test images blown up 4x."""
    from PIL import Image

    sources = sorted((SCENE15 / "test").rglob("*.jpg"))
    jpegs, pngs = [], []
    for source in sources[:: max(1, len(sources) // count)][:count]:
        with Image.open(source) as img:
            big = img.convert("RGB").resize((img.width * 4, img.height * 4), Image.BICUBIC)
        stem = folder / f"{source.parent.name}-{source.stem}"
        big.save(stem.with_suffix(".jpg"), quality=90)
        big.save(stem.with_suffix(".png"))
        jpegs.append(stem.with_suffix(".jpg"))
        pngs.append(stem.with_suffix(".png"))
    return jpegs, pngs


def distances(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: relative L2 distance of a from b, and their cosine similarity."""
    relative = np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return relative, cosine


def compare(name: str, files: list[Path], lossless: list[Path], extractor) -> dict:
    from tlfeat.data.decode import decode_image

    for path in files:
        path.read_bytes()
    rates: dict[str, list[float]] = {"full": [], "scaled": []}
    for _ in range(3):
        for side, decode in (("full", full_scale), ("scaled", lambda p: decode_image(p, SIZE))):
            start = time.perf_counter()
            for path in files:
                decode(path)
            rates[side].append(len(files) / (time.perf_counter() - start))
    full = np.stack([full_scale(p) for p in files])
    scaled = np.stack([decode_image(p, SIZE) for p in files])

    def features(pixels: np.ndarray) -> np.ndarray:
        rows = [extractor(pixels[i : i + 32]) for i in range(0, len(pixels), 32)]
        return np.concatenate(rows)

    f_full, f_scaled = features(full), features(scaled)
    relative, cosine = distances(f_scaled, f_full)
    jpeg_relative, jpeg_cosine = distances(f_full, features(np.stack([full_scale(p) for p in lossless])))
    return {
        "dataset": name, "files": len(files),
        "pixel_mean_abs_diff": float(np.abs(scaled.astype(np.int16) - full).mean()),
        "feature_relative_l2_median": float(np.median(relative)), "feature_relative_l2_max": float(relative.max()),
        "feature_cosine_min": float(cosine.min()),
        "jpeg_q90_vs_lossless_relative_l2_median": float(np.median(jpeg_relative)),
        "jpeg_q90_vs_lossless_relative_l2_max": float(jpeg_relative.max()),
        "jpeg_q90_vs_lossless_cosine_min": float(jpeg_cosine.min()),
        "decode_full_img_s": median(rates["full"]), "decode_scaled_img_s": median(rates["scaled"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--scene15-upscaled", type=int, default=200)
    parser.add_argument("--json", type=Path, help="also write the report to this file as JSON")
    args = parser.parse_args()
    from tlfeat.backbones import get_backbone
    from tlfeat.runtime import get_extractor

    extractor = get_extractor(get_backbone("efficientnet_lite0"), "imagenet", SIZE, 32)
    report: dict = {"command": bench_command(), "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        sets = [("photos-1024x768", make_photos(photos, args.photos), make_photos(photos, args.photos, suffix=".png"))]
        if args.scene15_upscaled and (SCENE15 / "test").is_dir():
            sets.append(("scene15-test-4x", *upscaled_scene15(Path(tmp), args.scene15_upscaled)))
        for name, files, lossless in sets:
            result = compare(name, files, lossless, extractor)
            report["results"].append(result)
            print(f"{name}: {result['files']} files; pixels differ by {result['pixel_mean_abs_diff']:.2f}/255 "
                  f"on average; Lite0 features: relative L2 median {result['feature_relative_l2_median']:.4f}, "
                  f"max {result['feature_relative_l2_max']:.4f}, cosine >= {result['feature_cosine_min']:.5f} "
                  f"(JPEG q90 vs lossless: median {result['jpeg_q90_vs_lossless_relative_l2_median']:.4f}, "
                  f"max {result['jpeg_q90_vs_lossless_relative_l2_max']:.4f}); "
                  f"decoding {result['decode_scaled_img_s']:.0f} vs {result['decode_full_img_s']:.0f} img/s "
                  f"({result['decode_scaled_img_s'] / result['decode_full_img_s']:.2f}x)")
    finish_report(report["command"], report, args.json)


if __name__ == "__main__":
    main()
