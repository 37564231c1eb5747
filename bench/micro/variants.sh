#!/bin/bash
# Times register-block variants of the backward kernel (rows x vectors).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); root=$(cd "$here/../.." && pwd); out=${TMPDIR:-/tmp}/ipex_lite_micro; mkdir -p "$out"
flags="-O3 -std=c++17 -I$root/csrc -DIPEX_LITE_ISA_NS=avx512_bf16 -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mavx512vnni -mprefer-vector-width=512 -Wno-maybe-uninitialized"
for v in "4 4" "6 4" "8 2" "2 4" "4 2" "12 2"; do
  set -- $v
  g++ $flags -DIPEX_LITE_BWD_ROWS=$1 -DIPEX_LITE_BWD_VECS=$2 -c "$root/csrc/kernels/interaction_kernel.cpp" -o "$out/k_$1_$2.o"
  g++ $flags "$here/interaction_kernel_bench.cpp" "$out/k_$1_$2.o" -o "$out/bench_$1_$2"
  echo "rows=$1 vecs=$2: $("$out/bench_$1_$2" 128 2048 | tr '\n' ' ')"
done
