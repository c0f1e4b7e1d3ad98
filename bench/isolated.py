"""One measurement per fresh Python process, so none pays for another's imports, caches or memory.

A bench script calls `run_isolated(__file__, kind, *args)`; the child is the same
script run with `--child kind args...`, and prints its result as JSON on its last
stdout line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_isolated(script: str, kind: str, *args: str) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, script, "--child", kind, *args], capture_output=True, text=True, env=env, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
