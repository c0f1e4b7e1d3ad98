"""tlfeat from Python, as a notebook would use it: extract once, fit heads, predict, compare.

    python examples/notebook_quickstart.py DATA [--out FOLDER] [--image-size N]

DATA is a folder of class folders (or train/[val/]test/ folders of class folders). Everything is
written under --out (default: cache/), never inside DATA.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import tlfeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--out", type=Path, default=Path("cache"))
    parser.add_argument("--image-size", type=int, default=None, help="default: the backbone's own")
    args = parser.parse_args()

    print("backbones:", ", ".join(b.name for b in tlfeat.list_backbones()))
    print("heads:", ", ".join(h.name for h in tlfeat.list_heads()))

    cache = args.out / f"{args.data.name}-example.h5"
    summary = tlfeat.extract(args.data, out=cache, image_size=args.image_size, progress=False)
    print(f"extracted {summary.n_images} images x {summary.feature_dim} dims into {summary.out}")

    train = tlfeat.load(cache, split="train")
    print(f"train split: {train.features.shape[0]} rows, classes {train.class_names}")

    fitted = tlfeat.fit_heads([cache], head="logreg", out=args.out / "example-heads")
    for result in fitted.results:
        print(result.head, {split: round(s["accuracy"], 3) for split, s in result.scores.items()})

    model = fitted.out / "logreg.skops"
    some_image = args.data / train.paths[0]
    prediction = tlfeat.predict(model, [some_image], top=2)
    print("predicted", prediction.predictions[0].path, prediction.predictions[0].top)

    table = tlfeat.compare([fitted.out])
    print(table.table)


if __name__ == "__main__":
    main()
