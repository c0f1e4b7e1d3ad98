"""Extraction throughput and memory: tlfeat extract vs the plain Keras way, in one run.

Usage:
    python bench/extract_throughput.py [--backbones resnet101 vgg16] [--images 256] [--repeats 3]
        [--memory-backbone efficientnet_lite0] [--memory-sizes 500 2000] [--scene15 DIR]
        [--no-baseline] [--warm] [--json OUT]

For each backbone, the same N Scene15 images (random weights, so no download)
go through, each run in its own subprocess, --repeats times in turn:
  * baseline: keras.utils.image_dataset_from_directory + model.predict, the
    backbone's keras preprocess_input mapped over the dataset (needs TensorFlow;
    --no-baseline leaves it out, e.g. on a GPU machine without TensorFlow);
  * tlfeat: tlfeat.extraction.run.extract into a fresh cache;
  * compute alone: tlfeat's own extractor (same batch size and precision) over
    the same images already decoded into memory (uint8, scaled inside the
    compiled model, every batch dispatched before any result is fetched), after
    a warm-up batch: what the backbone computes per second with no decoding,
    tracing or writing. No
    pipeline beats it by much; where tlfeat is close to it the backbone is
    compute-bound, and only faster arithmetic would go faster.
Baseline and tlfeat are timed from just after the model is built to the last
feature (tracing included). Medians over the repeats are reported, with the
range: on a shared VM one process can run at half the speed of the next.
Peak memory (max RSS of the whole process) of tlfeat extract is measured for
each --memory-sizes N, to show it does not grow with the dataset.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from statistics import median

from isolated import bench_command, finish_report, parse_bench_args, run_isolated

REPO = Path(__file__).resolve().parents[1]
SCENE15 = (REPO / ".." / "shared" / "data" / "scene15").resolve()


def make_subset(scene15: Path, n: int, dest: Path) -> Path:
    """The first n Scene15 images (train, then test), class-balanced, copied into a flat class-per-folder temp tree."""
    per_class: dict[str, list[Path]] = {}
    for split in ("train", "test"):
        if not (scene15 / split).is_dir():  # e.g. only train/ was taken along to another machine
            continue
        for class_dir in sorted((scene15 / split).iterdir()):
            per_class.setdefault(class_dir.name, []).extend(sorted(class_dir.iterdir()))
    n = min(n, sum(len(files) for files in per_class.values()))
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

    from tlfeat.backbones import get_backbone
    from tlfeat.data.batches import iter_batches
    from tlfeat.data.scan import scan_dataset
    from tlfeat.runtime import get_extractor

    spec = get_backbone(backbone)
    extractor = get_extractor(spec, "none", spec.input_size, None)
    scan = scan_dataset(Path(data))
    files = [scan.root / entry.relpath for entry in scan.entries]
    batches = [b.pixels[b.ok].copy()  # copied as they come: the pipeline reuses its buffers
               for b in iter_batches(files, spec.input_size, extractor.batch_size)]
    extractor(batches[0])  # warm-up: tracing is not compute
    start = time.perf_counter()
    pending = [extractor.submit(pixels) for pixels in batches]  # uint8 in, dispatched without waiting
    n = sum(len(p.result()) for p in pending)
    return {"images": n, "seconds": time.perf_counter() - start, "compute": extractor.compute,
            "batch_size": extractor.batch_size, "finite": bool(np.isfinite(extractor(batches[0])).all())}


def _child_tlfeat(data: str, backbone: str, out: str, weights: str, warm: str = "") -> dict:
    import numpy as np

    from tlfeat.backbones import get_backbone
    from tlfeat.extraction.run import extract
    from tlfeat.runtime import get_extractor

    spec = get_backbone(backbone)
    extractor = get_extractor(spec, weights, spec.input_size, None)  # built outside the clock, as the baseline's
    if warm:  # compile outside the clock too: the steady rate, which a large dataset approaches
        extractor(np.zeros((1, spec.input_size, spec.input_size, 3), dtype=np.uint8))
    start = time.perf_counter()
    summary = extract(Path(data), Path(out), backbone=backbone, weights=weights, progress=False)
    return {"images": summary.n_images, "seconds": time.perf_counter() - start}


def _child(kind: str, *args: str) -> dict:
    result = {"baseline": _child_baseline, "ceiling": _child_ceiling, "tlfeat": _child_tlfeat}[kind](*args)
    result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _rate(result: dict) -> float:
    return result["images"] / result["seconds"]


def _spread(rates: list[float]) -> str:
    return f"{median(rates):.2f}" + (f" ({min(rates):.2f}-{max(rates):.2f})" if len(rates) > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="*", default=["resnet101", "vgg16"])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, in turn; medians reported")
    parser.add_argument("--memory-backbone", default="efficientnet_lite0")
    parser.add_argument("--memory-sizes", nargs="*", type=int, default=[500, 2000])
    parser.add_argument("--scene15", type=Path, default=SCENE15, help="Scene15 folder (train/ and test/)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain Keras way (it needs TensorFlow)")
    parser.add_argument("--warm", action="store_true",
                        help="compile tlfeat's model before its clock starts (on a GPU, XLA compilation can "
                             "take longer than a small set's extraction)")
    args = parse_bench_args(parser, _child)
    if args is None:
        return

    if not args.scene15.is_dir():
        raise SystemExit(f"Scene15 not found at {args.scene15}")
    command = bench_command()
    report: dict = {"command": command, "cpu_count": os.cpu_count(), "throughput": [], "memory": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        data = make_subset(args.scene15, args.images, tmp_path / "subset")
        for backbone in args.backbones:
            runs: dict[str, list[dict]] = {"baseline": [], "tlfeat": [], "ceiling": []}
            for _ in range(args.repeats):
                if not args.no_baseline:
                    runs["baseline"].append(run_isolated(__file__, "baseline", str(data), backbone))
                out = tmp_path / f"{backbone}.h5"
                out.unlink(missing_ok=True)
                runs["tlfeat"].append(
                    run_isolated(__file__, "tlfeat", str(data), backbone, str(out), "none", "warm" if args.warm else "")
                )
                runs["ceiling"].append(run_isolated(__file__, "ceiling", str(data), backbone))
            rates = {side: [_rate(r) for r in results] for side, results in runs.items()}
            row = {"backbone": backbone, "images": runs["tlfeat"][0]["images"],
                   "compute": runs["ceiling"][0]["compute"], "batch_size": runs["ceiling"][0]["batch_size"],
                   "images_per_s": rates}
            ours, alone = median(rates["tlfeat"]), median(rates["ceiling"])
            line = f"{backbone}: tlfeat {_spread(rates['tlfeat'])} img/s; compute alone {_spread(rates['ceiling'])}"
            line += f" (tlfeat at {ours / alone:.0%} of it)"
            if rates["baseline"]:
                row["ratio"] = ours / median(rates["baseline"])
                line += f"; plain Keras {_spread(rates['baseline'])} img/s; tlfeat / plain {row['ratio']:.2f}x"
            report["throughput"].append(row)
            print(line, flush=True)
        for n in args.memory_sizes:
            subset = make_subset(args.scene15, n, tmp_path / f"mem{n}")
            ours = run_isolated(
                __file__, "tlfeat", str(subset), args.memory_backbone, str(tmp_path / f"mem{n}.h5"), "imagenet"
            )
            report["memory"].append({"backbone": args.memory_backbone, "images": n,
                                     "max_rss_mb": ours["max_rss_mb"], "images_per_s": _rate(ours)})
            print(f"{args.memory_backbone} on {n} images: peak RSS {ours['max_rss_mb']:.0f} MB, "
                  f"{_rate(ours):.1f} img/s", flush=True)
    if len(report["memory"]) > 1:
        first, last = report["memory"][0], report["memory"][-1]
        print(f"peak memory ratio {last['images']} vs {first['images']} images: "
              f"{last['max_rss_mb'] / first['max_rss_mb']:.2f}x")
    finish_report(command, report, args.json)


if __name__ == "__main__":
    main()
