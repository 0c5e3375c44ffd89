# rasterkube — the two commands in the README: `make demo` and `make test`.
# Both bootstrap .venv from the project's own files (pyproject.toml + pinned constraints).
# `make test-node` runs the real-node suite (root; installs the Debian packages it needs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONSTRAINTS := requirements/constraints.txt
PYTEST_ARGS ?=

.PHONY: install demo test test-unit test-node node-deps bench bench-large bench-operator crds check-crds dockerfile clean

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
	$(PY) -m pytest --ignore=tests/node $(PYTEST_ARGS)

# Debian packages of the node (containerd, runc, CNI plugins, iptables, conntrack) and of the
# image builder (debootstrap), installed with apt when missing.
node-deps: $(STAMP)
	$(PY) -m rasterkube_devstack.debian --image

# The real node: chart installed with helm, KubeRay running Ray pods, faults (tests/node).
test-node: node-deps
	$(PY) -m pytest tests/node $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/bench_loo_medoid.py --json out/bench/loo_medoid.json
	$(PY) bench/bench_changescore_memory.py --json out/bench/changescore_memory.json
	$(PY) bench/bench_vectorize.py --json out/bench/vectorize.json
	$(PY) bench/bench_mosaic.py --json out/bench/mosaic.json
	$(PY) bench/bench_predict.py --json out/bench/predict.json
	$(PY) bench/bench_precision.py --request-batches 4 --json out/bench/precision.json
	$(PY) bench/bench_reads.py --json out/bench/reads.json
	$(PY) bench/bench_resume.py --json out/bench/resume.json
	$(PY) bench/bench_calibrate.py --json out/bench/calibrate.json

# 16384² px jobs: about half an hour on 2 cores, so not part of `make bench`.
bench-large: $(STAMP)
	$(PY) bench/bench_large.py --json out/bench/large.json

bench-operator: $(STAMP)
	$(PY) bench/bench_operator.py --json out/bench/operator.json

crds: $(STAMP)
	$(VENV)/bin/rasterkube crds

check-crds: $(STAMP)
	$(VENV)/bin/rasterkube crds --check

# The registry Dockerfile, rendered from the image recipe the dev node builds without Docker.
dockerfile: $(STAMP)
	$(PY) -m rasterkube_devstack.rasterkube_image --dockerfile

clean:
	rm -rf out .pytest_cache
