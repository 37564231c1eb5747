#!/usr/bin/env bash
# CI step: a clean clone of HEAD built with LDFLAGS=-static-libstdc++ (the environment that once
# produced a _C whose every error message crashed the process) must either be refused by setup.py's
# link check, naming the problem, or come out linked against the process's libstdc++ and raise
# complete error messages.  Uses the torch of an existing venv; the checkout's own build is untouched.
#
#   scripts/check_static_libstdcxx.sh [PYTHON]    # default: .venv/bin/python of this checkout
set -euo pipefail
root=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
py=${1:-$root/.venv/bin/python}
scratch=$(mktemp -d -t ipex-lite-static-XXXXXX)
trap 'rm -rf "$scratch"' EXIT
git clone --quiet "$root" "$scratch/src"
cd "$scratch/src"
echo "static-libstdc++ check: building $(git rev-parse --short HEAD) with LDFLAGS='-static-libstdc++ -static-libgcc'"
start=$(date +%s)
if LDFLAGS="-static-libstdc++ -static-libgcc" CXXFLAGS="-static" "$py" setup.py build_ext --inplace \
        >build.log 2>&1; then
    echo "static-libstdc++ check: built in $(( $(date +%s) - start )) s"
    if ! grep -Eq "ignoring .*-static-libstdc\+\+.* from LDFLAGS" build.log; then
        echo "FAIL: the build did not say it dropped -static-libstdc++" >&2; tail -20 build.log >&2; exit 1
    fi
    grep "ipex_lite: ignoring" build.log | sort -u
    PYTHONPATH=. "$py" - <<'PY'
import os
import sys
import torch
import ipex_lite
from ipex_lite import _linkcheck

so = _linkcheck.installed_module()
assert so and os.path.dirname(os.path.dirname(so)) == os.getcwd(), f"not the clone's build: {so}"
result = _linkcheck.check(so)
print("NEEDED:", ", ".join(result["needed"]))
if not result["ok"]:
    sys.exit(f"FAIL: {result['problem']}")
try:
    torch.ops.ipex_lite.interaction_forward([torch.randn(4, 8), torch.randn(5, 8)])
except RuntimeError as e:
    msg = str(e)
else:
    sys.exit("FAIL: a bad call did not raise")
want = "interaction_forward: inputs[1] has batch size 5 but inputs[0] has 4"
if want not in msg:
    sys.exit(f"FAIL: error message incomplete: {msg!r}")
print("static-libstdc++ check: linked dynamically, error message complete:", repr(want))
PY
else
    if grep -q "the linked extension is unusable" build.log; then
        echo "static-libstdc++ check: refused, as it must be when the flags cannot be dropped:"
        grep "the linked extension is unusable" build.log
    else
        echo "FAIL: the build failed for another reason" >&2; tail -40 build.log >&2; exit 1
    fi
fi
