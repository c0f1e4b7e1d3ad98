"""The decoding pipeline's ceiling: extraction's batches with a model that costs nothing, vs plain Pillow.

Usage:
    python bench/pipeline_ceiling.py [--scene15 DIR] [--photos 500] [--photos-dir DIR] [--batch-size 256]
                                     [--workers 1 2 ...] [--repeats 3] [--min-images N] [--no-threads] [--json]

Two datasets: Scene15 train (1,500 small grey JPEGs) and `--photos` generated
1024x768 quality-90 colour JPEGs (bench/photos.py). On each, measured in turn
in every repeat (medians reported), all files read once beforehand so every
side finds them in the page cache:

  single_thread_pillow_img_s   one thread, plain Pillow: open, convert("RGB"), bilinear resize to 224, to numpy
  single_thread_tlfeat_img_s   one thread, tlfeat.data.decode.decode_into (JPEG DCT scaling where the file allows)
  pipeline_img_s[w]            tlfeat's pipeline: a DecodePool of w processes, batches of --batch-size in order,
                               each handed to a "model" returning zeros; the pool is started and has decoded one
                               small batch before the clock (as in extract, where it starts while the backbone
                               loads); pool_start_s is that start
  ..._cpu_us_per_img           CPU time per image (single thread; workers + this process for the pipeline):
                               on a busy shared machine the wall-clock rates say how much CPU the run got,
                               these say what the pipeline costs
  threads_img_s[w]             the design not taken: w threads decoding each batch into one preallocated
                               uint8 buffer, one batch ahead (tlfeat.data.decode.decode_into, same files)

--json prints one JSON object per dataset instead of the table (keys as above,
worker counts as strings). Workers default to 1 .. the available cores.
--min-images repeats a dataset's file list until it is that long (`images`;
`files` stays the distinct count), so many cores still have seconds of work.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import median

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tlfeat, run from anywhere

from photos import make_photos  # noqa: E402
from tlfeat.data.batches import DecodePool  # noqa: E402
from tlfeat.data.cores import available_cores  # noqa: E402
from tlfeat.data.decode import decode_into  # noqa: E402

SCENE15 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "scene15"
SIZE = 224
FEATURE_DIM = 1280  # the zeros "model" returns Lite0-sized rows


def plain_pillow(files: list[Path]) -> float:
    from PIL import Image

    start = time.perf_counter()
    for path in files:
        with Image.open(path) as img:
            np.asarray(img.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
    return len(files) / (time.perf_counter() - start)


def single_tlfeat(files: list[Path]) -> tuple[float, float]:
    """(images/s, CPU microseconds per image)."""
    out = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    start, cpu = time.perf_counter(), time.process_time()
    for path in files:
        decode_into(path, out)
    return len(files) / (time.perf_counter() - start), (time.process_time() - cpu) / len(files) * 1e6


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pipeline(files: list[Path], workers: int, batch_size: int) -> tuple[float, float, float]:
    """(images/s, seconds the pool took to start and decode its first small batch, CPU microseconds per image
    of the workers and this process together)."""
    started = time.perf_counter()
    with DecodePool(workers) as pool:
        for _ in pool.batches(files[:workers], SIZE, batch_size):
            pass
        ready = time.perf_counter()
        pids = [w.process.pid for w in pool.workers]
        cpu = time.process_time() + sum(_cpu_seconds(pid) for pid in pids)
        n = 0
        for batch in pool.batches(files, SIZE, batch_size):
            features = np.zeros((batch.length, FEATURE_DIM), dtype=np.float32)[batch.ok]
            n += len(features)
        seconds = time.perf_counter() - ready
        cpu = time.process_time() + sum(_cpu_seconds(pid) for pid in pids) - cpu
        return n / seconds, ready - started, cpu / n * 1e6


def threads(files: list[Path], workers: int, batch_size: int) -> float:
    buffers = np.empty((2, batch_size, SIZE, SIZE, 3), dtype=np.uint8)

    def decode(job: tuple[int, int, Path]) -> None:
        slot, row, path = job
        decode_into(path, buffers[slot, row])

    def submit(pool: ThreadPoolExecutor, index: int) -> list:
        chunk = files[index * batch_size : (index + 1) * batch_size]
        return [pool.submit(decode, (index % 2, row, path)) for row, path in enumerate(chunk)]

    n_batches = math.ceil(len(files) / batch_size)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        ahead = submit(pool, 0)
        for index in range(n_batches):
            current, ahead = ahead, submit(pool, index + 1) if index + 1 < n_batches else []
            for future in current:
                future.result()
    return len(files) / (time.perf_counter() - start)


def measure(name: str, files: list[Path], workers: list[int], batch_size: int, repeats: int, with_threads: bool) -> dict:
    distinct = list(dict.fromkeys(files))  # single-thread rates need each file once
    for path in distinct:  # into the page cache, for every side alike
        path.read_bytes()
    runs: dict[str, list] = {"pillow": [], "tlfeat": [], "tlfeat_cpu": []}
    for _ in range(repeats):
        runs["pillow"].append(plain_pillow(distinct))
        rate, cpu = single_tlfeat(distinct)
        runs["tlfeat"].append(rate)
        runs["tlfeat_cpu"].append(cpu)
        for w in workers:
            rate, start, cpu = pipeline(files, w, batch_size)
            runs.setdefault(f"pipeline{w}", []).append(rate)
            runs.setdefault(f"start{w}", []).append(start)
            runs.setdefault(f"cpu{w}", []).append(cpu)
            if with_threads:
                runs.setdefault(f"threads{w}", []).append(threads(files, w, batch_size))
    report = {
        "dataset": name, "files": len(distinct), "images": len(files), "batch_size": batch_size, "repeats": repeats,
        "cores": available_cores(), "load_average_1m": os.getloadavg()[0],
        "single_thread_pillow_img_s": median(runs["pillow"]),
        "single_thread_tlfeat_img_s": median(runs["tlfeat"]),
        "pipeline_img_s": {str(w): median(runs[f"pipeline{w}"]) for w in workers},
        "pool_start_s": {str(w): median(runs[f"start{w}"]) for w in workers},
        "single_thread_tlfeat_cpu_us_per_img": median(runs["tlfeat_cpu"]),
        "pipeline_cpu_us_per_img": {str(w): median(runs[f"cpu{w}"]) for w in workers},
    }
    if with_threads:
        report["threads_img_s"] = {str(w): median(runs[f"threads{w}"]) for w in workers}
    return report


def print_table(report: dict) -> None:
    pillow = report["single_thread_pillow_img_s"]
    print(f"\n{report['dataset']}: {report['images']} images ({report['files']} files), batch {report['batch_size']}, median of "
          f"{report['repeats']}; 1-min load average at the end {report['load_average_1m']:.1f} "
          f"on {report['cores']} cores")
    print(f"  single thread, plain Pillow: {pillow:8.0f} img/s")
    print(f"  single thread, tlfeat decode: {report['single_thread_tlfeat_img_s']:7.0f} img/s, "
          f"{report['single_thread_tlfeat_cpu_us_per_img']:.0f} CPU us/img")
    one = report["pipeline_img_s"][next(iter(report["pipeline_img_s"]))]
    print("  workers  pipeline img/s  x 1 worker  x Pillow  CPU us/img  pool start s" +
          ("  threads img/s" if "threads_img_s" in report else ""))
    for w, rate in report["pipeline_img_s"].items():
        line = (f"  {w:>7}  {rate:14.0f}  {rate / one:10.2f}  {rate / pillow:8.2f}  "
                f"{report['pipeline_cpu_us_per_img'][w]:10.0f}  {report['pool_start_s'][w]:12.2f}")
        if "threads_img_s" in report:
            line += f"  {report['threads_img_s'][w]:13.0f}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scene15", type=Path, default=SCENE15, help="Scene15 folder (its train/ is used)")
    parser.add_argument("--photos", type=int, default=500, help="generated 1024x768 JPEGs (0: none)")
    parser.add_argument("--photos-dir", type=Path, help="where to generate them (reused if there); default a temp dir")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="*", help="worker counts (default 1 .. available cores)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-images", type=int, default=0, help="repeat each file list up to this length")
    parser.add_argument("--no-threads", action="store_true", help="skip the thread-pool comparison")
    parser.add_argument("--json", action="store_true", help="print one JSON object per dataset instead")
    args = parser.parse_args()
    workers = args.workers or list(range(1, available_cores() + 1))
    datasets = []
    train = args.scene15 / "train"
    if train.is_dir():
        datasets.append(("scene15-train", sorted(p for p in train.rglob("*") if p.is_file())))
    with tempfile.TemporaryDirectory() as tmp:
        if args.photos:
            folder = args.photos_dir or Path(tmp) / "photos"
            datasets.append(("photos-1024x768-q90", make_photos(folder, args.photos)))
        for name, files in datasets:
            files = files * max(1, math.ceil(args.min_images / len(files)))
            report = measure(name, files, workers, args.batch_size, args.repeats, not args.no_threads)
            if args.json:
                print(json.dumps(report), flush=True)
            else:
                print_table(report)
    if not args.json:
        print(f"command: python bench/pipeline_ceiling.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
