#!/bin/bash
# Builds the interaction kernel at the best ISA level and times it without torch.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${TMPDIR:-/tmp}/ipex_lite_micro
mkdir -p "$out"
flags="-O3 -std=c++17 -I$root/csrc -DIPEX_LITE_ISA_NS=avx512_bf16 -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mavx512vnni -mprefer-vector-width=512 -Wno-maybe-uninitialized"
g++ $flags -c "$root/csrc/kernels/interaction_kernel.cpp" -o "$out/k.o"
g++ $flags "$here/interaction_kernel_bench.cpp" "$out/k.o" -o "$out/bench"
"$out/bench" "$@"
