# The two commands a newcomer needs: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dmq-installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch and torchvision first and together, so that the resolver pairs matching builds
	$(PY) -m pip install --quiet torch torchvision
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# make demo ARGS="--models dit --presets w8a8 --nfe 5" selects models, presets, samplers, NFE (scripts/demo.py -h)
demo: $(STAMP)
	$(PY) scripts/demo.py $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2

bench: $(STAMP)
	$(PY) scripts/bench_formats.py
	$(PY) scripts/render_readme.py

clean:
	rm -rf $(VENV) build *.egg-info
