#!/usr/bin/env bash
# Build and test ipex_lite against another torch, outside CI and without touching this
# checkout's venv or in-place build: a clean clone of HEAD in a scratch directory runs
# `make test TORCH_SPEC=<spec>` there (its own venv, its own build).
#
#   scripts/test_other_torch.sh "torch==2.8.0 torchvision==0.23.0"   # the oldest torch ipex_lite supports
#   scripts/test_other_torch.sh "torch==2.13.0" /tmp/t   # keep the scratch clone in /tmp/t
#
# The spec is make's TORCH_SPEC: a space-separated list of requirements.  torch 2.13 is installed from
# this machine's disk (no torchvision imports beside it: those tests skip); torch 2.8 comes from the
# package index (its PyPI wheels pull in the CUDA runtime packages, ~3 GB; PIP_ARGS="--find-links DIR"
# reuses a `pip download` of them).
set -euo pipefail
spec=${1:?usage: $0 TORCH_SPEC [SCRATCH_DIR]}
root=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
scratch=${2:-$(mktemp -d -t ipex-lite-torch-XXXXXX)}
rm -rf "$scratch"
git clone --quiet "$root" "$scratch"
echo "testing $(git -C "$scratch" rev-parse --short HEAD) against $spec in $scratch"
cd "$scratch"
make test TORCH_SPEC="$spec"
"$scratch/.venv/bin/python" -c "import torch, ipex_lite; print('passed on torch', torch.__version__, 'with ipex_lite', ipex_lite.__version__)"
