#!/usr/bin/env bash
# Compile-check every csrc/*.cu (syntax and template instantiation) with plain nvcc, no PyTorch
# headers needed: the .cu files are torch-free by design. Exit nonzero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
  echo "compile_cuda: nvcc not found, skipping the CUDA compile check"
  exit 0
fi
arch="${MULTIMOE_CUDA_GENCODE:--gencode=arch=compute_90,code=sm_90}"
out="$(mktemp -d /tmp/multimoe_cu.XXXXXX)"
status=0
for f in csrc/*.cu; do
  [ -e "$f" ] || continue
  if nvcc -std=c++17 $arch -Werror all-warnings -c "$f" -o "$out/$(basename "$f" .cu).o"; then
    echo "compile_cuda: ok   $f"
  else
    echo "compile_cuda: FAIL $f"
    status=1
  fi
done
rm -rf "$out"
exit $status
