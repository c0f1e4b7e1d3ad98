"""How long the CLI takes to answer before any work: `--help`, a command's `--help` and `backbones`, against
another checkout of tlfeat (e.g. the commit before a change) and against bare Python, interleaved.

    git worktree add /tmp/tlfeat-before <commit>
    python bench/cli_startup.py --before /tmp/tlfeat-before [--repeats 7]

Prints the median wall time (process start to exit) of each command per checkout and the ratio
before/this; the ratio is what to compare across machines, the seconds move with the load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = (["--help"], ["fit-head", "--help"], ["audit", "--help"], ["backbones"])


def _seconds(checkout: Path | None, args: list[str]) -> float:
    command = [sys.executable, "-c", "pass"] if checkout is None else [sys.executable, str(checkout / "cli.py"), *args]
    env = {**os.environ, "PYTHONPATH": str(checkout or REPO)}
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="another checkout of tlfeat (the baseline)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    _seconds(REPO, ["--help"]), _seconds(args.before, ["--help"])  # warm the file cache and .pyc files
    python = statistics.median(_seconds(None, []) for _ in range(args.repeats))
    print(f"bare python -c pass: {python:.2f} s (load {os.getloadavg()[0]:.1f})")
    for command in COMMANDS:
        times: dict[str, list[float]] = {"before": [], "this": []}
        for _ in range(args.repeats):  # interleaved, so a change of load hits both alike
            times["before"].append(_seconds(args.before, command))
            times["this"].append(_seconds(REPO, command))
        before, this = (statistics.median(times[k]) for k in ("before", "this"))
        print(f"tlfeat {' '.join(command):<16} before {before:5.2f} s  this {this:5.2f} s  before/this {before / this:4.1f}x")


if __name__ == "__main__":
    main()
