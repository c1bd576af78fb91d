#!/usr/bin/env bash
# The one prepared GPU check: installs the project first (editable, against the preinstalled torch, which it
# never replaces), then every step under its time limit (355 s in all), JSON rewritten after every step under
# $OUT (default bench/results/), a short table last. Exit 1 if any step failed.
#   bash bench/gpu_check.sh            # on the GPU machine (python3 with torch/triton preinstalled)
#   bash bench/gpu_check.sh --dry-run  # any CPU machine: every step's code path at tiny sizes
# Uses $PYTHON if set, else python3 from PATH. Steps and what each writes: bench/gpu_check.py's docstring.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
# torch guesses CUDA_HOME from the first nvcc on PATH, wrong where that is a wrapper script: take the real
# toolkit directory (also what setup.py does); an explicit CUDA_HOME holding the headers wins.
if home="$("$PY" multimoe_rt/_cuda_home.py 2>/dev/null | cut -f1)" && [ -n "$home" ] && [ "$home" != None ]; then
  export CUDA_HOME="$home"
fi
echo "gpu_check: python $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])'), CUDA_HOME=${CUDA_HOME:-none}"
exec "$PY" bench/gpu_check.py "$@"
