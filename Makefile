# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	# torch first, pinned: on CPU machines this is the CPU build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) jobs/demo.py --config configs/demo.yaml

test: install
	$(PY) -m pytest tests

bench: install
	$(PY) benchmarks/data_pipeline.py
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf outputs .pytest_cache
