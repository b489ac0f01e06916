# make demo: install into .venv and run the whole pipeline on the embedded default (configs/default.yaml).
# make test: install with the dev extras and run the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install data browser demo test test-slow test-cluster bench clean

# pip -qq: errors only (its warnings, one per unreachable index location, were most of make demo's output)
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -e '.[dev,lite]'
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST from Debian's package when the files are missing and apt is available.
data:
	@if [ ! -f $(FMNIST) ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST not found and apt-get unavailable: set data.path or data.download=true"; fi; \
	fi

# Debian's Chromium and its driver for the browser tests (tests/test_browser*.py), when missing and apt is available.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver; \
	  else echo "chromium not found and apt-get unavailable: the browser tests are skipped"; fi; \
	fi

demo: install data
	$(PY) -m jobs.pipeline --config configs/default.yaml

# TESTS: a subset (files), default the whole default suite
TESTS ?=
test: install data browser
	$(PY) -m pytest $(TESTS)

test-slow: install data
	$(PY) -m pytest -m slow

# Several real Ray nodes on this one machine (tests/test_cluster_*.py): node loss in Train, Tune, ensemble tasks
# and Serve, a preemption notice, the fake_multinode autoscaler, data beyond the object store. Its own process:
# each module starts and stops its own nodes. CLUSTER_TESTS: a subset (files), default all of them.
CLUSTER_TESTS ?=
test-cluster: install data
	$(PY) -m pytest -m cluster $(CLUSTER_TESTS)

bench: install data
	$(PY) bench/data.py

clean:
	rm -rf runs .pytest_cache
