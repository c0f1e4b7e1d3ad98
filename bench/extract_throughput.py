"""Extraction throughput and memory: tlfeat extract vs the plain Keras way, in one run.

Usage:
    python bench/extract_throughput.py [--backbones resnet101 vgg16] [--images 256]
        [--memory-backbone efficientnet_lite0] [--memory-sizes 500 2000] [--json OUT]

For each backbone, the same N Scene15 images (random weights, so no download)
go through:
  * baseline: keras.utils.image_dataset_from_directory + model.predict, the
    backbone's keras preprocess_input mapped over the dataset (needs TensorFlow);
  * tlfeat: tlfeat.extract.extract into a fresh cache;
  * ceiling: model.predict alone over the same images already decoded into one
    numpy array, after a warm-up batch: what the backbone computes per second
    with no decoding, tracing or writing at all. No pipeline can beat it; it
    tells a compute-bound backbone (where the plain way is already close to it)
    from a pipeline problem.
Each side runs in its own subprocess and is timed from just after the model is
built to the last feature (tracing/compiling included for baseline and tlfeat).
Peak memory (max RSS of the whole process) of tlfeat extract is measured for
each --memory-sizes N, to show it does not grow with the dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from isolated import run_isolated

REPO = Path(__file__).resolve().parents[1]
SCENE15 = (REPO / ".." / "shared" / "data" / "scene15").resolve()


def make_subset(n: int, dest: Path) -> Path:
    """The first n Scene15 images (train, then test), class-balanced, copied into a flat class-per-folder temp tree."""
    per_class: dict[str, list[Path]] = {}
    for split in ("train", "test"):
        for class_dir in sorted((SCENE15 / split).iterdir()):
            per_class.setdefault(class_dir.name, []).extend(sorted(class_dir.iterdir()))
    chosen, i = [], 0
    while len(chosen) < n:
        for files in per_class.values():
            if i < len(files) and len(chosen) < n:
                chosen.append(files[i])
        i += 1
    for path in chosen:
        target = dest / path.parent.name / f"{path.parent.parent.name}_{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)  # a temp copy: tlfeat's scan ignores symlinks leaving the dataset
    return dest


def _child_baseline(data: str, backbone: str) -> dict:
    import keras
    import numpy as np

    from tlfeat.backbones import build_model, get_backbone

    spec = get_backbone(backbone)
    model = build_model(spec, "none")
    preprocess = {"resnet101": keras.applications.resnet.preprocess_input,
                  "vgg16": keras.applications.vgg16.preprocess_input}[backbone]
    start = time.perf_counter()
    dataset = keras.utils.image_dataset_from_directory(
        data, labels="inferred", image_size=(224, 224), batch_size=32, shuffle=False, verbose=False
    ).map(lambda x, y: preprocess(x))
    features = model.predict(dataset, verbose=0)
    seconds = time.perf_counter() - start
    return {"images": int(len(features)), "seconds": seconds, "finite": bool(np.isfinite(features).all())}


def _child_ceiling(data: str, backbone: str) -> dict:
    import numpy as np

    from tlfeat.backbones import build_model, get_backbone
    from tlfeat.dataset import scan_dataset
    from tlfeat.decode import iter_batches

    spec = get_backbone(backbone)
    model = build_model(spec, "none")
    scan = scan_dataset(Path(data))
    files = [scan.root / entry.relpath for entry in scan.entries]
    images = np.concatenate([b.images for b in iter_batches(files, spec.input_size, spec.preprocess, 32)])
    model.predict(images[:32], batch_size=32, verbose=0)
    start = time.perf_counter()
    model.predict(images, batch_size=32, verbose=0)
    return {"images": len(images), "seconds": time.perf_counter() - start}


def _child_tlfeat(data: str, backbone: str, out: str, weights: str) -> dict:
    from tlfeat.backbones import get_backbone
    from tlfeat.extract import extract, get_extractor

    spec = get_backbone(backbone)
    get_extractor(spec, weights, spec.input_size, None)  # build outside the timed part, as the baseline does
    start = time.perf_counter()
    summary = extract(Path(data), Path(out), backbone=backbone, weights=weights, progress=False)
    return {"images": summary.n_images, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="*", default=["resnet101", "vgg16"])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--memory-backbone", default="efficientnet_lite0")
    parser.add_argument("--memory-sizes", nargs="*", type=int, default=[500, 2000])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        kind, *rest = args.child
        result = {"baseline": _child_baseline, "ceiling": _child_ceiling, "tlfeat": _child_tlfeat}[kind](*rest)
        result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    if not SCENE15.is_dir():
        raise SystemExit(f"Scene15 not found at {SCENE15}")
    report: dict = {"cpu_count": os.cpu_count(), "throughput": [], "memory": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        data = make_subset(args.images, tmp_path / "subset")
        for backbone in args.backbones:
            base = run_isolated(__file__, "baseline", str(data), backbone)
            ours = run_isolated(__file__, "tlfeat", str(data), backbone, str(tmp_path / f"{backbone}.h5"), "none")
            ceiling = run_isolated(__file__, "ceiling", str(data), backbone)
            row = {
                "backbone": backbone,
                "images": ours["images"],
                "keras_images_per_s": base["images"] / base["seconds"],
                "tlfeat_images_per_s": ours["images"] / ours["seconds"],
                "ceiling_images_per_s": ceiling["images"] / ceiling["seconds"],
            }
            row["ratio"] = row["tlfeat_images_per_s"] / row["keras_images_per_s"]
            report["throughput"].append(row)
            print(f"{backbone}: plain Keras {row['keras_images_per_s']:.2f} img/s, "
                  f"tlfeat {row['tlfeat_images_per_s']:.2f} img/s, ratio {row['ratio']:.2f}x; "
                  f"forward pass alone {row['ceiling_images_per_s']:.2f} img/s "
                  f"(plain {row['keras_images_per_s'] / row['ceiling_images_per_s']:.0%} of it, "
                  f"tlfeat {row['tlfeat_images_per_s'] / row['ceiling_images_per_s']:.0%})", flush=True)
        for n in args.memory_sizes:
            subset = make_subset(n, tmp_path / f"mem{n}")
            ours = run_isolated(
                __file__, "tlfeat", str(subset), args.memory_backbone, str(tmp_path / f"mem{n}.h5"), "imagenet"
            )
            report["memory"].append({"backbone": args.memory_backbone, "images": n,
                                     "max_rss_mb": ours["max_rss_mb"], "images_per_s": n / ours["seconds"]})
            print(f"{args.memory_backbone} on {n} images: peak RSS {ours['max_rss_mb']:.0f} MB, "
                  f"{n / ours['seconds']:.1f} img/s", flush=True)
    if len(report["memory"]) > 1:
        first, last = report["memory"][0], report["memory"][-1]
        print(f"peak memory ratio {last['images']} vs {first['images']} images: "
              f"{last['max_rss_mb'] / first['max_rss_mb']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
