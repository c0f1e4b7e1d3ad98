"""What JPEG DCT scaling (Pillow's draft) does to a classifier: Scene15 at camera-like sizes, extracted both ways.

Usage:
    python bench/jpeg_draft_accuracy.py [--per-class N] [--json OUT]

Every Scene15 image (train and test; or the first N of each class and split)
is blown up 4x (bicubic, ~1000x800) and saved as a quality-90 JPEG, so that
tlfeat's decoder may let libjpeg decode it at 1/2 scale (both sides >= 2x 224).
The set is then extracted twice with EfficientNet-Lite0 (offline ImageNet
weights, float32, the default split), each run in its own process:
  * scaled: tlfeat as it is (`draft`, then the documented bilinear resize);
  * full: the same with Pillow's `JpegImageFile.draft` made a no-op in every process
    (a `sitecustomize` on PYTHONPATH, so the decoding processes have it too):
    every file is decoded at full size, then resized (tlfeat before DCT scaling).
On each cache the logistic-regression head is fitted as `fit-head --head logreg`
does, and its test accuracy is reported, with how many test predictions the two
heads share and the feature distances between the caches, row by row. The
extraction times are reported too (read them as the machine's load allows).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tlfeat, run from anywhere

from isolated import bench_command, finish_report, parse_bench_args, run_isolated  # noqa: E402
from jpeg_draft import SCENE15, distances  # noqa: E402

UPSCALE = 4
# Imported by every Python process started with its folder on PYTHONPATH, tlfeat's decoding processes included.
NO_DRAFT = "from PIL import JpegImagePlugin\nJpegImagePlugin.JpegImageFile.draft = lambda self, mode, size: None\n"


def _blow_up(job: tuple[Path, Path]) -> None:
    from PIL import Image

    source, target = job
    with Image.open(source) as img:
        big = img.convert("RGB").resize((img.width * UPSCALE, img.height * UPSCALE), Image.BICUBIC)
    target.parent.mkdir(parents=True, exist_ok=True)
    big.save(target, quality=90)


def upscaled_dataset(dest: Path, per_class: int | None) -> int:
    """Scene15's train/ and test/ blown up into `dest` (same layout); returns the number of images."""
    jobs = []
    for split in ("train", "test"):
        for class_dir in sorted((SCENE15 / split).iterdir()):
            files = sorted(class_dir.glob("*.jpg"))[:per_class]
            jobs += [(f, dest / split / class_dir.name / f.name) for f in files]
    with Pool(2) as pool:
        pool.map(_blow_up, jobs, chunksize=16)
    return len(jobs)


def _child(side: str, data: str, out: str) -> dict:
    from PIL import JpegImagePlugin

    from tlfeat.extraction.run import extract
    from tlfeat.heads.fit import fit_heads

    if (side == "full") != (JpegImagePlugin.JpegImageFile.draft.__name__ == "<lambda>"):
        raise SystemExit(f"{side}: PIL's draft is not as this side needs it")
    start = time.perf_counter()
    summary = extract(Path(data), Path(out), progress=False)
    seconds = time.perf_counter() - start
    fitted = fit_heads([summary.out], head="logreg", out=Path(out).with_suffix(".heads"))
    scores = fitted.results[0].scores
    return {"images": summary.n_images, "extract_seconds": seconds,
            "test_accuracy": scores["test"]["accuracy"], "test_n": scores["test"]["n"],
            "val_accuracy": scores["val"]["accuracy"]}


def _test_predictions(cache: Path, heads: Path) -> np.ndarray:
    from tlfeat.cache import load
    from tlfeat.heads.store import load_head

    model, _ = load_head(heads / "logreg.skops")
    return model.predict(load(cache, split="test").features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, help="only the first N images of each class and split")
    args = parse_bench_args(parser, _child)
    if args is None:
        return
    if not (SCENE15 / "test").is_dir():
        raise SystemExit(f"Scene15 not found at {SCENE15}")
    from tlfeat.cache import load

    report: dict = {"command": bench_command()}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "scene15-4x"
        start = time.perf_counter()
        report["images"] = upscaled_dataset(data, args.per_class)
        print(f"{report['images']} images blown up {UPSCALE}x in {time.perf_counter() - start:.0f} s")
        caches = {side: Path(tmp) / f"{side}.h5" for side in ("scaled", "full")}
        (Path(tmp) / "no_draft").mkdir()
        (Path(tmp) / "no_draft" / "sitecustomize.py").write_text(NO_DRAFT)
        for side, cache in caches.items():
            if side == "full":
                os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(tmp) / "no_draft"),
                                                                          os.environ.get("PYTHONPATH")]))
            report[side] = run_isolated(__file__, side, str(data), str(cache))
            print(f"{side}: test accuracy {report[side]['test_accuracy']:.4f} on {report[side]['test_n']} images "
                  f"(val {report[side]['val_accuracy']:.4f}); extract {report[side]['extract_seconds']:.0f} s")
        scaled, full = (load(caches[side]) for side in ("scaled", "full"))
        assert list(scaled.paths) == list(full.paths)
        relative, cosine = distances(scaled.features, full.features)
        shared = _test_predictions(caches["scaled"], caches["scaled"].with_suffix(".heads")) == _test_predictions(
            caches["full"], caches["full"].with_suffix(".heads"))
        report.update(feature_relative_l2_median=float(np.median(relative)), feature_relative_l2_max=float(relative.max()),
                      feature_cosine_min=float(cosine.min()), test_predictions_shared=float(shared.mean()))
        print(f"features, scaled vs full: relative L2 median {np.median(relative):.4f}, max {relative.max():.4f}, "
              f"cosine >= {cosine.min():.4f}; the two heads agree on {shared.mean():.2%} of the test images; "
              f"extract {report['full']['extract_seconds'] / report['scaled']['extract_seconds']:.2f}x faster scaled")
    finish_report(report["command"], report, args.json)


if __name__ == "__main__":
    main()
