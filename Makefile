# rasterkube — the two commands in the README: `make demo` and `make test`.
# Both bootstrap .venv from the project's own files (pyproject.toml + pinned constraints).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONSTRAINTS := requirements/constraints.txt
PYTEST_ARGS ?=

.PHONY: install demo test test-unit bench bench-operator crds check-crds clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "rasterkube needs Python >= 3.11 (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[test,dev,pmtiles,bench]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rasterkube demo --out out/demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/bench_loo_medoid.py --json out/bench/loo_medoid.json
	$(PY) bench/bench_changescore_memory.py --json out/bench/changescore_memory.json
	$(PY) bench/bench_vectorize.py --json out/bench/vectorize.json
	$(PY) bench/bench_mosaic.py --json out/bench/mosaic.json
	$(PY) bench/bench_predict.py --json out/bench/predict.json
	$(PY) bench/bench_reads.py --json out/bench/reads.json

bench-operator: $(STAMP)
	$(PY) bench/bench_operator.py --json out/bench/operator.json

crds: $(STAMP)
	$(VENV)/bin/rasterkube crds

check-crds: $(STAMP)
	$(VENV)/bin/rasterkube crds --check

clean:
	rm -rf out .pytest_cache
