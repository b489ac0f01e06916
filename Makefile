# make demo: install into .venv and run the whole pipeline on the embedded default (configs/default.yaml).
# make test: install with the dev extras and run the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install data demo test test-slow bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,lite]'
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

demo: install data
	$(PY) -m jobs.pipeline --config configs/default.yaml

test: install data
	$(PY) -m pytest

test-slow: install data
	$(PY) -m pytest -m slow

bench: install data
	$(PY) bench/data.py

clean:
	rm -rf runs .pytest_cache
