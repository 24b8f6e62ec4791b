#!/usr/bin/env bash
# A queue of grid cells, one after another, each finished cell's result archived at once into benchmarks/runs/NAME
# (benchmarks/archive_runs.py: a machine's runs/ is not kept, the archive is committed). Two queues fit side by side
# on 2 cores / 24 GB (a SmolLM2 cell peaks at ~8 GB), one thread each:
#   benchmarks/run_cells.sh configs/smollm2-seeds.yaml smollm2-seeds 0 1 2 3 &
#   benchmarks/run_cells.sh configs/smollm2-seeds.yaml smollm2-seeds 4 5 6 &
# Run `qrunlearn run CONFIG --out runs/NAME --prepare` first (both queues would otherwise train the same target),
# and `archive_runs.py restore NAME` to continue an archived run on a fresh machine. Logs: runs/logs/NAME-cell-N.log.
# A regime sweep's runs: `benchmarks/regime_sweep.py ... --write-configs` prints their queues (NAME sweep/full_lr_X).
set -u
if [ $# -lt 3 ]; then
  echo "usage: $0 CONFIG NAME CELL..." >&2
  exit 2
fi
config=$1 name=$2
shift 2
cd "$(dirname "$0")/.." || exit 2
mkdir -p runs/logs
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
log_name=${name//\//-}  # a nested run (a regime sweep's lr, regime-seeds-npo/full_lr_1e-05) logs beside the others
for cell in "$@"; do
  started=$(date +%s)
  log="runs/logs/$log_name-cell-$cell.log"
  if .venv/bin/qrunlearn run "$config" --out "runs/$name" --cell "$cell" --no-progress > "$log" 2>&1; then
    echo "$(date -u +%FT%TZ) $name cell $cell done in $(( $(date +%s) - started )) s"
  else
    echo "$(date -u +%FT%TZ) $name cell $cell failed (exit $?): $log"
  fi
  .venv/bin/python benchmarks/archive_runs.py save "$name"
done
