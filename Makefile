# contrastive-repro: two commands on a fresh machine.
#   make reproduce   # set up if needed, recompute every notebook on PROFILE (default cpu) into build/reproduce/,
#                    # then compare with the committed results/ and print the wall times
#   make test        # set up if needed, unit tests + nbval on the notebooks (smoke profile)
#   make record      # maintainers: recompute and record into results/ (clean tree only), rebuild the README table
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= cpu
NOTEBOOKS ?=
FORCE ?= 0
ALLOW_DIRTY ?= 0
RTOL ?= 0.05
ATOL ?= 0.001
RUN_ARGS = --profile $(PROFILE) $(if $(NOTEBOOKS),--only $(NOTEBOOKS)) $(if $(filter 1,$(FORCE)),--force) \
	--rtol $(RTOL) --atol $(ATOL)
STAMP := $(VENV)/.installed
DEB_PACKAGES := dataset-fashion-mnist unicode-data fonts-noto-color-emoji
DEB_FILES := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz /usr/share/unicode/emoji/emoji-test.txt /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONHASHSEED := 0
export MPLBACKEND := Agg

.PHONY: setup system-data reproduce record test unit nbval table bench clean-results help

help:
	@echo "make reproduce [PROFILE=smoke|cpu|paper] [NOTEBOOKS='00_tour 01_...'] [FORCE=1] [RTOL=0.05 ATOL=0.001]"
	@echo "               recompute into build/reproduce/PROFILE (resumes there; FORCE=1 starts over), compare with"
	@echo "               results/, write build/reproduce/PROFILE/comparison.json"
	@echo "make record    [PROFILE=...] [NOTEBOOKS=...] [ALLOW_DIRTY=1]  recompute and record into results/"
	@echo "make test      unit tests + nbval (smoke profile)"
	@echo "make table     rebuild the README results table from results/*/*/metrics.json"
	@echo "make bench     run the benchmarks in benchmarks/ (writes results/benchmarks/)"

setup: system-data $(STAMP)

# Offline datasets that come from Debian packages. Installed when missing and we are root; otherwise say what to do.
system-data:
	@missing=0; for f in $(DEB_FILES); do [ -e "$$f" ] || missing=1; done; \
	if [ $$missing = 1 ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "[setup] installing Debian packages: $(DEB_PACKAGES)"; \
	    (apt-get install -y -qq $(DEB_PACKAGES) >/dev/null 2>&1 || (apt-get update -qq >/dev/null && apt-get install -y -qq $(DEB_PACKAGES) >/dev/null)) \
	      || { echo "[setup] apt-get failed: install $(DEB_PACKAGES) by hand"; exit 1; }; \
	  else \
	    echo "[setup] missing offline data files: $(DEB_FILES)"; \
	    echo "[setup] run as root:  apt-get install $(DEB_PACKAGES)"; exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "[setup] $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip >/dev/null
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

reproduce: setup
	$(PY) -m reproduce.run $(RUN_ARGS)

record: setup
	$(PY) -m reproduce.run --record $(RUN_ARGS) $(if $(filter 1,$(ALLOW_DIRTY)),--allow-dirty)
	$(PY) -m reproduce.table --write-readme
	$(PY) -m reproduce.claims --write-readme

test: setup unit nbval

unit: setup
	$(PY) -m pytest -q tests --junitxml=build/test-reports/unit.xml

nbval: setup
	$(PY) -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env --nbval-cell-timeout=300 notebooks/ \
	  --junitxml=build/test-reports/nbval.xml
	-@$(PY) -m reproduce.test_timings

table: setup
	$(PY) -m reproduce.table --write-readme
	$(PY) -m reproduce.claims --write-readme

bench: setup
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean-results:
	rm -rf results/*/smoke build/reproduce build/record
