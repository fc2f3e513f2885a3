# Two entry points for a fresh machine: `make demo` (CP-Flow learning an OT map) and `make test`.
# Both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-slow lint docs bench demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch/torchvision first, pinned, so pip takes the builds available offline
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 -m "not slow" -q

test-slow: $(STAMP)
	$(PY) -m pytest -n 2 -m slow -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# the API reference, the maths and the notebooks (rendered, not executed) into docs/_build/html;
# every warning is an error, and -E rereads every page so that none is missed
docs: $(STAMP)
	$(PY) -m sphinx -E -W --keep-going -b html docs docs/_build/html

# each demo run gets its own folder: a finished run is never started over
demo: $(STAMP)
	$(PY) -m experiments.demo --out-dir experiments/runs/demo-$$(date +%Y%m%d-%H%M%S)

bench: $(STAMP)
	$(PY) -m experiments.benchmarks.inverse_solvers
	$(PY) -m experiments.benchmarks.engine --out experiments/benchmarks/results/engine_row_gram.json
	$(PY) -m experiments.benchmarks.engine --only threshold --out experiments/benchmarks/results/engine_threshold_row_gram.json
	$(PY) -m experiments.benchmarks.derivatives --out experiments/benchmarks/results/derivatives_row_gram.json
	$(PY) -m experiments.benchmarks.logdet_variance
	$(PY) -m experiments.benchmarks.compile_step
	$(PY) -m experiments.benchmarks.optimizer_overhead
	$(PY) -m experiments.benchmarks.guide_step --out experiments/benchmarks/results/guide_step_one_layer.json
	$(PY) -m experiments.benchmarks.guide_step --setting engine --out experiments/benchmarks/results/guide_step_engine_one_layer.json
	$(PY) -m experiments.benchmarks.flow_ops --out experiments/benchmarks/results/flow_ops_one_layer.json

clean:
	rm -rf $(VENV) .pytest_cache docs/_build docs/tutorials
