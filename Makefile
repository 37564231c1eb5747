# ipex_lite: `make test`, `make demo`, `make bench`; each creates/updates .venv itself.
#
# The default is current torch with its torchvision (the pair pip takes from this machine's
# package cache for Python 3.11).  TORCH_SPEC is a space-separated list of requirements:
#   make test TORCH_SPEC="torch==2.8.0 torchvision==0.23.0"   # build and test against another torch
#   make test TORCH_SPEC="torch==2.13.0" VENV=.venv-2.13      # ... in its own venv (the in-place
#                                         # extension is rebuilt whenever the torch in use changes)
# Tests that need torchvision, timm or transformers skip (with the reason) where they do not import.
#   make test PYTHON=python3.12           # base interpreter for a new .venv
#
# The venv is (re)populated only when TORCH_SPEC, HF_SPEC or TIMM_SPEC change (stamp .venv/.deps-<spec>).
# `build` does the editable install once, then always `setup.py build_ext --inplace`
# (ninja, incremental: seconds when little changed).

PYTHON     ?= python3
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Real-model test dependencies.  timm is installed without its dependencies so that it can never
# replace the torch/torchvision pair above (its own non-torch dependencies are listed instead).
HF_SPEC    ?= transformers==5.17.0
TIMM_SPEC  ?= timm==1.0.29
TIMM_DEPS  ?= pyyaml huggingface_hub safetensors
PIP_ARGS   ?=
VENV       ?= .venv
VPY        := $(VENV)/bin/python
VPIP       := $(VPY) -m pip

empty :=
space := $(empty) $(empty)
SPEC_TAG := $(subst $(space),_,$(subst /,_,$(subst *,x,$(subst <,lt,$(subst >,gt,$(subst =,,$(subst ~,,$(subst !,not,$(TORCH_SPEC) $(HF_SPEC) $(TIMM_SPEC)))))))))
DEPS_STAMP := $(VENV)/.deps-$(SPEC_TAG)

.PHONY: all venv build test demo bench docs sanitize clean distclean

all: test

venv: $(DEPS_STAMP)

$(DEPS_STAMP):
	@if [ -x "$(VPY)" ] && ! "$(VPY)" -c "import sys" >/dev/null 2>&1; then \
		echo "make: $(VENV) is broken (base interpreter gone?); recreating it"; rm -rf "$(VENV)"; \
	fi
	@if [ ! -x "$(VPY)" ]; then \
		echo "make: creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv "$(VENV)"; \
	fi
	$(VPIP) install $(PIP_ARGS) $(foreach r,$(TORCH_SPEC),'$(r)') numpy pytest hypothesis ninja "setuptools>=64" wheel
	@# transformers does not depend on torch; pip must not change the torch just installed
	$(VPIP) install $(PIP_ARGS) '$(HF_SPEC)' $(TIMM_DEPS) || echo "make: transformers not installable here; Hugging Face model tests will skip"
	$(VPIP) install $(PIP_ARGS) --no-deps '$(TIMM_SPEC)' || echo "make: timm not installable here; timm model tests will skip"
	@# scikit-learn ships the real dataset (digits) of the int8 accuracy tests; they skip without it
	$(VPIP) install $(PIP_ARGS) scikit-learn || echo "make: scikit-learn not installable here; real-data int8 accuracy tests will skip"
	$(VPIP) install $(PIP_ARGS) matplotlib || echo "make: matplotlib not installable here; the benchmark report will have no charts"
	@rm -f $(VENV)/.deps-*
	@touch "$@"

# 1. Editable install when the venv does not have ipex_lite installed from this checkout; it
#    builds _C in place (in pip's scratch directory), so that build counts as current.
# 2. Otherwise build_ext --inplace --force (ninja in build/ recompiles only what changed, then
#    relinks) when the .so is missing, older than csrc/, setup.py or the deps stamp, or was built
#    for another venv/torch (build/.built-for), since setuptools alone notices none of these.
build: venv
	@want="$$("$(VPY)" -c 'import sys, torch; print(sys.prefix, torch.__version__)')"; \
	if ! "$(VPY)" -c "import importlib.metadata as m, json, os, sys, urllib.parse as up; \
d = m.distribution('ipex_lite'); u = json.loads(d.read_text('direct_url.json') or '{}'); \
here = os.path.realpath(up.unquote(up.urlparse(u.get('url', '')).path)); \
sys.exit(0 if u.get('dir_info', {}).get('editable') and here == os.path.realpath('.') else 1)" \
			>/dev/null 2>&1 || ! "$(VPY)" -c "import ipex_lite.launcher" >/dev/null 2>&1; then \
		echo "make: installing ipex_lite (editable) into $(VENV)"; \
		$(VPIP) install $(PIP_ARGS) --no-build-isolation --no-deps -e . || exit 1; \
		if ls ipex_lite/_C*.so >/dev/null 2>&1; then mkdir -p build && echo "$$want" > build/.built-for; fi; \
	fi; \
	so=$$(ls ipex_lite/_C*.so 2>/dev/null | head -n 1); \
	if [ -z "$$so" ] || [ "$$(cat build/.built-for 2>/dev/null)" != "$$want" ] \
			|| [ -n "$$(find csrc setup.py ipex_lite/_linkcheck.py $(DEPS_STAMP) -newer "$$so" -print -quit 2>/dev/null)" ]; then \
		echo "$(VPY) setup.py build_ext --inplace --force"; \
		"$(VPY)" setup.py build_ext --inplace --force && mkdir -p build && echo "$$want" > build/.built-for; \
	else \
		echo "make: $$so is up to date"; \
	fi

# torch raises on a custom op whose outputs alias (instead of warning) only when CI is set;
# the test target asks for it everywhere so that a local run fails where CI would.
test: build
	TORCHINDUCTOR_ERROR_ON_CUSTOM_OP_ALIASING=1 $(VPY) -m pytest -q tests

# The main job: a launcher-wrapped inference run (allocator, OpenMP and core binding set by
# ipex-lite-run), stock vs ipex_lite side by side, outputs checked to agree.
demo: build
	$(VPY) -m ipex_lite.doctor
	$(VENV)/bin/ipex-lite-run --throughput-mode tutorials/quickstart.py
	$(VENV)/bin/ipex-lite-run --throughput-mode bench/dlrm.py --quick --no-compile --no-train
	$(VENV)/bin/ipex-lite-run --throughput-mode tutorials/llm.py

# The documentation site (docs/, Sphinx + MyST; API reference by autodoc on the built package) in
# docs/_build/html.  Its tools (docs/requirements.txt, exact versions) go into the same venv under a
# stamp of their own, so installing them never invalidates $(DEPS_STAMP) (no torch reinstall, no
# rebuild).  Every warning is an error (-W -n: unresolved references too); -E rereads every page, so
# a docstring change is seen and a second run cannot pass on a cached, warning-free environment.
DOCS_STAMP := $(VENV)/.docs-deps
$(DOCS_STAMP): docs/requirements.txt | $(DEPS_STAMP)
	$(VPIP) install $(PIP_ARGS) -r docs/requirements.txt
	@touch "$@"

docs: build $(DOCS_STAMP)
	$(VENV)/bin/sphinx-build -E -W --keep-going -n -b html docs docs/_build/html

# every bench/ script, then bench/report/REPORT.md + charts (`python -m bench --quick`: ~2 minutes)
bench: build
	$(VPY) -m bench

# ASan + UBSan build of the extension in .sanitize/ (a copy of the tracked tree, so the normal
# build is untouched), then the op test files under it.  Python itself is not instrumented: the
# runtime is preloaded, and leak detection is off (CPython and torch keep allocations to exit).
SANITIZE_TESTS ?= tests/test_interaction.py tests/test_embedding_bag.py tests/test_optimizer.py \
                  tests/test_quantization.py tests/test_vision.py tests/test_fuzz.py tests/test_aten_overrides.py \
                  tests/test_packed_weights.py tests/test_attention.py tests/test_winograd.py tests/test_pooling.py
sanitize: venv
	rm -rf .sanitize && mkdir -p .sanitize
	git ls-files -z | xargs -0 cp --parents -t .sanitize
	cd .sanitize && IPEX_LITE_SANITIZE=1 ../$(VPY) setup.py -q build_ext --inplace
	cd .sanitize && LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
		ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 PYTHONPATH=. \
		../$(VPY) -m pytest -q -p no:cacheprovider $(SANITIZE_TESTS)

clean:
	rm -rf build *.egg-info .pytest_cache .hypothesis .sanitize docs/_build
	rm -f ipex_lite/_C*.so
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
