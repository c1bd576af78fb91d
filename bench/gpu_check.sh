#!/usr/bin/env bash
# The one prepared GPU check (issue 8): versions + ceilings, CUDA build, GPU tests, kernel timings,
# variant-switch overlap, JSON under $OUT (default bench/results/), a short table last.
#   bash bench/gpu_check.sh            # on the GPU machine (system python3 with torch/triton preinstalled)
#   bash bench/gpu_check.sh --dry-run  # any CPU machine: every step's code path at tiny sizes (CI runs this)
# Uses $PYTHON if set, else python3 from PATH (an activated venv's python3 in CI).
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
