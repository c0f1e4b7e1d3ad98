"""Do the study's head and the fine-tune head train under each Keras backend as under TensorFlow?

Usage:
    python bench/backend_training.py [--backends tensorflow jax] [--repo DIR] [--json OUT]

On 5 well-separated gaussian classes of 192 non-negative features scaled by 30
(as large as pooled CNN features get; the blobs of tests/conftest.py, seed 1,
100 rows a class), each backend in its own process, seeded:
  * report head: `KerasReportHead(seed=0, epochs=5)` fitted on the rows;
  * fine-tune head: `build_finetune_model` on a stand-in base that flattens an
    8x8x3 "image" into the 192 features, `compile_model(lr 1e-3)`, 5 epochs.
Reported: the training accuracy of each (1.0 is what the data allows; chance
is 0.2). `--repo` runs another checkout's tlfeat (e.g. a `git worktree` of an
older commit), to measure before and after a change with the same script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tlfeat, run from anywhere

from isolated import bench_command, finish_report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
import json, keras, numpy as np
from tlfeat.finetuning.model import build_finetune_model, compile_model
from tlfeat.heads.keras_head import KerasReportHead

rng = np.random.default_rng(1)  # tests/conftest.py's gaussian_blobs(100, 5, 192, 1)
centres = rng.uniform(0, 6, size=(5, 192))
y = np.repeat(np.arange(5), 100)
X = 30 * np.abs(centres[y] + rng.normal(0, 1.0, size=(len(y), 192))).astype(np.float32)
report = (KerasReportHead(seed=0, epochs=5).fit(X, y).predict(X) == y).mean()
inputs = keras.Input((8, 8, 3))
base = keras.Model(inputs, keras.layers.Flatten()(inputs))
keras.utils.set_random_seed(0)
model = build_finetune_model(base, 5, 8, "flat")
compile_model(model, 1e-3, "auto")
images = X.reshape(-1, 8, 8, 3)
model.fit(images, y, epochs=5, verbose=0)
finetune = (np.argmax(model.predict(images, verbose=0), 1) == y).mean()
print(json.dumps({"backend": keras.backend.backend(), "report_head": float(report), "finetune_head": float(finetune)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="*", default=["tensorflow", "jax"])
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose tlfeat is measured")
    parser.add_argument("--json", type=Path, help="also write the report to this file as JSON")
    args = parser.parse_args()
    report: dict = {"command": bench_command(), "repo": str(args.repo), "results": []}
    for backend in args.backends:
        env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(args.repo), "TF_CPP_MIN_LOG_LEVEL": "2"}
        result = subprocess.run([sys.executable, "-c", CHILD, str(args.repo)], capture_output=True, text=True,
                                env=env, check=False)
        if result.returncode != 0:
            raise SystemExit(f"{backend} child failed:\n{result.stderr[-3000:]}")
        row = json.loads(result.stdout.strip().splitlines()[-1])
        report["results"].append(row)
        print(f"{row['backend']}: training accuracy, report head {row['report_head']:.3f}, "
              f"fine-tune head {row['finetune_head']:.3f}")
    finish_report(report["command"], report, args.json)


if __name__ == "__main__":
    main()
