#!/usr/bin/env bash
# Run every experiment file in experiments/ (each writes runs/experiments/<name>/).
#   experiments/run_all.sh            full size (hours on 2 CPU cores)
#   experiments/run_all.sh --smoke    every file's [smoke] sizes (a few minutes)
# BENCH_LOCK=/path/to/lockfile wraps each run in flock, so timings do not overlap other jobs.
set -euo pipefail
cd "$(dirname "$0")/.."
INTERP=${INTERP:-$( [ -x .venv/bin/interp ] && echo .venv/bin/interp || echo interp )}
for config in experiments/*.toml; do
  echo "== $config"
  ${BENCH_LOCK:+flock "$BENCH_LOCK"} "$INTERP" experiment run "$config" "$@"
done
