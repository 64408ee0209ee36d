PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: install test run compile bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) artifacts .pytest_cache

run: install
	$(VENV)/bin/blueprint run --profile default

compile: install
	$(VENV)/bin/blueprint compile --out pipeline.yaml

bench: install
	$(PY) benchmarks/shard_throughput.py
	$(PY) benchmarks/reward_throughput.py
	$(PY) benchmarks/ppo_throughput.py
