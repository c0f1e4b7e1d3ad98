"""The README's first command, timed as a new user meets it: `demo` with an empty $TLFEAT_HOME (the Lite0
weights conversion included), then the same command again (weights and features reused).

    python bench/demo_time.py [--repeats 1]

Prints both wall times (process start to exit, imports included), their ratio and the machine's load
average around each run, since the figures move with whatever else shares the CPUs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _timed_demo(out: Path, home: Path) -> float:
    env = {**os.environ, "TLFEAT_HOME": str(home), "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "cli.py"), "demo", "-q", "--out", str(out)], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="first-run/rerun pairs, each from empty folders")
    args = parser.parse_args()
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="tlfeat-demo-") as scratch:
            home, out = Path(scratch) / "home", Path(scratch) / "out"
            load_before = os.getloadavg()[0]
            first = _timed_demo(out, home)
            load_between = os.getloadavg()[0]
            rerun = _timed_demo(out, home)
            load_after = os.getloadavg()[0]
        print(f"first run {first:.1f} s, rerun {rerun:.1f} s, first/rerun {first / rerun:.2f}x; "
              f"1-min load average {load_before:.1f} / {load_between:.1f} / {load_after:.1f} "
              f"on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
