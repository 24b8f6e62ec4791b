#!/usr/bin/env bash
# Times the main job on the built-in default from scratch (data, target/retrain training, the full grid)
# and prints the wall time against the 10-minute target. Usage: bash benchmarks/bench_demo.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/bench-demo}"
rm -rf "$out"
start=$(date +%s.%N)
.venv/bin/qrunlearn run --out "$out" --no-progress
end=$(date +%s.%N)
python3 - "$start" "$end" "$out" <<'PY'
import json, sys
start, end, out = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
wall = end - start
cells = json.load(open(f"{out}/results.json"))["cells"]
print(f"main job wall time: {wall:.1f} s ({wall / 600:.2f}x the 600 s budget)")
for cell in cells:
    print(f"  {cell['cell']:<16} {cell['wall_seconds']:6.1f} s (unlearn {cell['unlearn']['seconds']:.1f} s)")
PY
