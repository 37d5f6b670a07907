# fedcore developer commands. `make demo` and `make test` work from a fresh clone: they create
# .venv and install what is missing first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PROTO_SRC := protos/fedcore/v1/fedcore.proto

.PHONY: setup demo test test-fast lint typecheck linktree docs check proto bench bench-secagg bench-wan bench-mnist bench-analytics clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

# Three test processes on two cores, one file each at a time (module-scoped federations stay in
# one process), in the order tests/conftest.py gives: files with the most slow tests first. A
# third process fills the time the other two wait on their federations (idle, 2 cores: 5.5 min
# against 7.3 with two).
test: $(STAMP)
	$(PY) -m pytest -n 3 --dist loadfile --no-loadscope-reorder

# The edit loop: everything but the slow tier (real federations, audits, long training runs).
test-fast: $(STAMP)
	$(PY) -m pytest -n 3 --dist loadfile --no-loadscope-reorder -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(MAKE) typecheck

# mypy and the API reference's static analysis cannot follow setuptools' editable-install import
# hook, so they read a tree of links that mirrors the installed layout (server/ ->
# fedcore/server, worker/ -> fedcore/worker).
linktree:
	rm -rf build/typecheck && mkdir -p build/typecheck/fedcore
	for f in fedcore/*; do ln -s ../../../$$f build/typecheck/fedcore/; done
	ln -s ../../../server build/typecheck/fedcore/server
	ln -s ../../../worker build/typecheck/fedcore/worker

# The package, then tests/, scripts/ and examples/: these import their neighbours as top-level
# modules (pytest's rootdir imports; the sys.path entries some add for scripts/ and examples/),
# and mypy reads them so too. The cache lives beside the link tree, which linktree rebuilds.
MYPY := ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml --cache-dir ../mypy_cache

typecheck: $(STAMP) linktree
	cd build/typecheck && MYPYPATH=. $(MYPY) -p fedcore
	cd build/typecheck && MYPYPATH=.:../../tests:../../scripts:../../examples $(MYPY) ../../tests ../../scripts ../../examples

# The documentation site (docs/ + mkdocs.yml) into build/site; strict: a broken link, anchor or
# API reference fails the build.
docs: $(STAMP) linktree
	$(VENV)/bin/mkdocs build --strict --quiet

check: lint docs test

proto: $(STAMP)
	$(PY) scripts/gen_proto.py

bench: $(STAMP)
	$(PY) scripts/bench_overhead.py

bench-secagg: $(STAMP)
	mkdir -p build && $(PY) scripts/bench_secagg.py --quick --out build/bench_secagg.json

# Every silo behind its own emulated link (delay, rate): fedcore vs a bare grpc.aio echo;
# e.g. make bench-wan ARGS="--workers 8 --rtt-ms 50 200 --variant default slots", or issue 28's
# grid a few points at a time: ARGS="--grid issue28 --list", then ARGS="--grid issue28 --pick 0-1 --ceiling".
bench-wan: $(STAMP)
	mkdir -p build && $(PY) scripts/bench_wan.py --out build/bench_wan.json $(ARGS)

# The cross-silo MNIST benchmark; e.g. make bench-mnist ARGS="--compare @privacy".
bench-mnist: $(STAMP)
	$(PY) scripts/bench_mnist.py $(ARGS)

# Federated analytics: DP error of mean, histogram and median vs epsilon (3 and 10 silos).
bench-analytics: $(STAMP)
	mkdir -p build && $(PY) scripts/bench_analytics.py --out build/bench_analytics

clean:
	rm -rf build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
