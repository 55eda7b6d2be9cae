"""Import time of Echelon's layers, each in a fresh interpreter, against `import torch` (the floor
for anything that holds tensors).

The planes and secure aggregation import no ML framework beyond torch (tests/test_layering.py
checks the imports statically); this measures what that buys: `import echelon.planes.device`
costs about what torch costs, not torch plus transformers and peft.

    .venv/bin/python benchmarks/imports.py [--quick]

Prints median wall seconds over the repetitions (--quick: 1, and fewer modules; else 5), the
ratio to torch's, and whether transformers or grpc got imported; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

MODULES = [
    "torch",
    "echelon",
    "echelon.config",
    "echelon.planes.device",
    "echelon.planes.boundary",
    "echelon.planes.coordinator",
    "echelon.secagg",
    "echelon.runtime.sim.engine",
    "echelon.runner",
]
QUICK = ["torch", "echelon", "echelon.planes.device", "echelon.secagg", "echelon.runner"]
PROBE = (
    "import sys, time; t = time.perf_counter(); import {m}; dt = time.perf_counter() - t; "
    "print(dt, 'transformers' in sys.modules, 'grpc' in sys.modules)"
)


def measure(module: str) -> tuple[float, bool, bool]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(m=module)], capture_output=True, text=True, check=True
    ).stdout.split()
    return float(out[0]), out[1] == "True", out[2] == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repetition per module")
    args = parser.parse_args()
    reps, modules = (1, QUICK) if args.quick else (5, MODULES)
    rows = {}
    for m in modules:
        runs = [measure(m) for _ in range(reps)]
        rows[m] = (statistics.median(r[0] for r in runs), runs[0][1], runs[0][2])
    torch_s = rows["torch"][0]
    print(f"{'module':32} {'wall s':>8} {'x torch':>8}  transformers  grpc")
    for m, (s, hf, rpc) in rows.items():
        print(f"{m:32} {s:8.2f} {s / torch_s:8.2f}  {'yes' if hf else 'no':>12}  {'yes' if rpc else 'no':>4}")
    print(json.dumps({m: {"wall_s": round(s, 3), "transformers": hf} for m, (s, hf, _) in rows.items()}))


if __name__ == "__main__":
    main()
