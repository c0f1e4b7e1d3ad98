"""Helpers shared by the bench scripts: one measurement per fresh Python process, and the report's ending.

A bench script calls `run_isolated(__file__, kind, *args)`; the child is the same
script run with `--child kind args...`, and prints its result as JSON on its last
stdout line. So no measurement pays for another's imports, caches or memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable


def run_isolated(script: str, kind: str, *args: str) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, script, "--child", kind, *args], capture_output=True, text=True, env=env, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def parse_bench_args(parser: argparse.ArgumentParser, child: Callable[..., dict]) -> argparse.Namespace | None:
    """Finish a bench's command line with --json and run_isolated's hidden --child.

    In a child process, runs `child(kind, *args)`, prints its result as JSON and returns None.
    """
    parser.add_argument("--json", type=Path, help="also write the report to this file as JSON")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return None
    return args


def bench_command() -> str:
    """The command line that is running, as a reader would retype it from the repository root."""
    return shlex.join(["python", f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def finish_report(command: str, report: dict, json_path: Path | None) -> None:
    """Close a bench's output with the machine and the command, and write the JSON report if asked."""
    print(f"{os.cpu_count()} CPUs; command: {command}")
    if json_path:
        json_path.write_text(json.dumps(report, indent=2))
